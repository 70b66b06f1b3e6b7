"""MFTCoder's four MFT train configs, in their shape (the keys MFTCoder ships in its lora, qlora, full and coba
train configs; the values this repository's), each loaded as it is and trained 3 steps on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mftune.cli import main
from mftune.train.checkpoint import complete_checkpoints
from mftune.train.tracking import read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"

COMMON = {
    "model_type": "llama",
    "load_raw_dataset": True,
    "data_split": "90,10,0",
    "padding_mode": "padding",
    "use_dynamic_padding": True,
    "tokenize_mode": "sft",
    "tokenizer_type": "AutoTokenizer",
    "weighted_loss_mode": "case3",
    "attn_implementation": "flash_attention_2",
    "seq_length": 255,
    "seed": 7,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "learning_rate": 1e-3,
    "min_lr": 1e-4,
    "weight_decay": 0.1,
    "gradient_accumulation_steps": 2,
    "lr_scheduler_type": "cosine",
    "num_warmup_steps": 1,
    "num_train_epochs": 1,
    "resume_from_checkpoint": None,
    "log_interval": 1,
    "checkpointing_steps": 1,
    "evaluation_steps": 3,
    "max_train_steps": 3,
    "epoch_checkpointing": False,
    "shuffle_before_split": True,
    "early_stopping": True,
    "early_stopping_stall_num": 5,
    "saving_limit": None,
}
ADAPTER = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05}
SHAPES = {
    "lora": {**COMMON, **ADAPTER, "peft_type": "lora", "quantization": None},
    "qlora": {**COMMON, **ADAPTER, "peft_type": "qlora", "quantization": "4bit"},
    "full": {**COMMON, "peft_type": None, "quantization": None},
    "coba": {
        **COMMON,
        **ADAPTER,
        "peft_type": "lora",
        "quantization": None,
        "weighted_loss_mode": "coba",
        "coba_warmup_steps": 1,
        "coba_history_length": 10,
        "coba_tau": 5,
        "coba_update_interval": 1,
        "coba_sample_valid_num": 1,
    },
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_mftcoder_config_shape_trains(shape: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw = {
        **SHAPES[shape],
        "data_paths": f"[{EXAMPLES / 'write_test'},{EXAMPLES / 'write_function'}]",
        "output_dir": "run",
        "tb_dir": "run/tensorboard",
        "pretrained_model_path": str(tiny_model_dir),
    }
    config = tmp_path / f"{shape}_train_config.json"
    config.write_text(json.dumps(raw))
    assert main(["train", str(config), "data.num_proc=1"]) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert {"valid/write_test/loss", "valid/write_function/loss"} <= {k for r in rows for k in r}
    # saving_limit null: every checkpoint under LoRA and QLoRA, the last 2 (and the best) under full fine-tuning.
    kept = [p.name for p in complete_checkpoints(tmp_path / "run")]
    assert kept == (
        ["step-00000002", "step-00000003"] if shape == "full" else ["step-0000000" + s for s in "123"]
    )
    if shape == "coba":
        assert any("coba/write_test/weight" in r for r in rows)
