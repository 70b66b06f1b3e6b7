"""MFTCoder train configs: every key read as MFTCoder's code reads it (`mftcoder_accelerate`, `MftTrainArgs`
and `mft_accelerate.py`), the defaults of keys left out being MFTCoder's, and each difference noted."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mftune.config import ConfigError, load_config
from mftune.config.mftcoder import from_mftcoder
from mftune.train.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]


def _mftcoder(**extra: Any) -> dict[str, Any]:
    return {
        "data_paths": "[data/code_completion, 'data/code_exercise']",
        "pretrained_model_path": "org/base",
        "output_dir": "out",
        "tb_dir": "tb",
        "model_type": "llama",
        "weighted_loss_mode": "case3",
        **extra,
    }


def _load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: dict[str, Any]):
    """Load `raw` from a file in a subfolder, from `tmp_path` as the working folder."""
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    (folder / "train.json").write_text(json.dumps(raw))
    monkeypatch.chdir(tmp_path)
    return load_config(folder / "train.json")


def test_bracketed_string_and_list_agree() -> None:
    from_string, _ = from_mftcoder(_mftcoder())
    from_list, _ = from_mftcoder(_mftcoder(data_paths=["data/code_completion", "data/code_exercise"]))
    assert from_string == from_list
    assert from_list["data"]["tasks"] == [{"path": "data/code_completion"}, {"path": "data/code_exercise"}]


@pytest.mark.parametrize(
    "data_paths", ["data/a,data/b", "[data/a,data/b", "data/a]", "[data/a,,data/b]", "[]"]
)
def test_malformed_data_paths_is_an_error(data_paths: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mftcoder(_mftcoder(data_paths=data_paths))
    assert "data_paths" in str(info.value) and repr(data_paths) in str(info.value)


def test_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _mftcoder(
        data_weights="[1., 3]",
        task_weights=[2, 1],
        data_split="98,2,0",
        padding_mode="pack",
        peft_type="qlora",
        quantization="8bit",
        lora_rank=8,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        num_warmup_steps=0.1,
        early_stopping_stall_num=3,
        seq_length=1024,
        coba_tau=3,
        min_lr=1e-6,
        role_markers={"system": "S:", "user": "U:", "assistant": "A:"},
    )
    cfg = _load(tmp_path, monkeypatch, raw)
    tasks = cfg.data.tasks
    assert list(tasks) == ["code_completion", "code_exercise"]
    assert [t.sampling_weight for t in tasks.values()] == [None, None]  # MFTCoder resets data_weights to ones
    assert [t.loss_weight for t in tasks.values()] == [2.0, 1.0]
    assert tasks["code_exercise"].path == str(tmp_path / "data" / "code_exercise")  # the working folder's
    assert cfg.train.output_dir == str(tmp_path / "out")
    assert (cfg.data.valid_ratio, cfg.data.test_ratio) == (pytest.approx(0.02), 0.0)
    assert cfg.data.packing == "sequential"
    assert cfg.data.max_seq_len == 1025  # MFTCoder keeps samples of seq_length + 1 tokens
    assert cfg.data.template.role_markers.user == "U:"
    assert (cfg.finetune.method, cfg.finetune.qlora.bits, cfg.finetune.lora.r) == ("qlora", 4, 8)
    assert cfg.finetune.lora.bias == "lora_only"
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (2, 8)
    assert cfg.train.warmup_ratio == pytest.approx(0.1)
    assert cfg.train.early_stopping.patience == 3
    assert cfg.train.loss == "task"
    assert (cfg.train.min_lr, cfg.train.min_lr_mode, cfg.train.adam_beta2) == (1e-6, "floor", 0.999)
    assert cfg.coba.tau == 3.0
    assert cfg.model.name_or_path == "org/base"


def test_keys_left_out_take_mftcoders_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _load(tmp_path, monkeypatch, _mftcoder())
    assert cfg.finetune.method == "qlora"  # MftTrainArgs.peft_type
    assert (cfg.finetune.lora.r, cfg.finetune.lora.alpha, cfg.finetune.lora.dropout) == (96, 32, 0.05)
    assert (cfg.train.learning_rate, cfg.train.min_lr, cfg.train.weight_decay) == (5e-5, 5e-6, 0.01)
    assert (cfg.train.epochs, cfg.train.seed, cfg.data.seed) == (4, 1234, 1234)
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (8, 8)
    assert (cfg.train.log_every, cfg.train.save_every, cfg.train.eval_every) == (10, 100, 100)
    assert cfg.train.warmup_ratio == pytest.approx(0.05)
    assert cfg.data.max_seq_len == 4097 and cfg.data.valid_ratio == pytest.approx(0.02)
    assert (cfg.coba.warmup, cfg.coba.history, cfg.coba.update_interval, cfg.coba.probe_batches) == (
        100,
        200,
        1,
        8,
    )
    assert cfg.train.keep_last is None  # saving_limit null under QLoRA: every checkpoint kept
    assert cfg.model.attention == "auto"  # flash_attention_2, without requiring flash-attn
    _, notes = from_mftcoder(_mftcoder())
    assert any(
        note.startswith("left out, so MFTCoder's defaults: ") and "lora_rank 96" in note for note in notes
    )


@pytest.mark.parametrize(
    ("peft_type", "saving_limit", "keep_last"), [(None, None, 2), ("lora", None, None), ("lora", 3, 3)]
)
def test_saving_limit(peft_type, saving_limit, keep_last) -> None:
    raw, notes = from_mftcoder(_mftcoder(peft_type=peft_type, saving_limit=saving_limit))
    assert raw["train"]["keep_last"] == keep_last and raw["train"]["keep_best"] == 1
    assert raw["finetune"]["method"] == (peft_type or "full")
    if keep_last == 2:
        assert any("as MFTCoder sets it" in note for note in notes)


def test_data_split_holds_the_test_share_out() -> None:
    raw, _ = from_mftcoder(_mftcoder(data_split="90,5,5"))
    assert raw["data"]["valid_ratio"] == pytest.approx(0.05) and raw["data"]["test_ratio"] == pytest.approx(
        0.05
    )


@pytest.mark.parametrize(
    ("mode", "packing"), [("padding", "none"), ("pack", "sequential"), ("concat", "contiguous")]
)
def test_padding_modes(mode: str, packing: str) -> None:
    assert from_mftcoder(_mftcoder(padding_mode=mode))[0]["data"]["packing"] == packing


def test_quantization_is_ignored_as_mftcoder_ignores_it() -> None:
    raw, notes = from_mftcoder(_mftcoder(peft_type="lora", quantization="16bit"))
    assert raw["finetune"]["method"] == "lora" and "qlora" not in raw["finetune"]
    assert any(note.startswith("quantization: no effect") for note in notes)


def test_pretrain_mode_trains_every_token_without_markers() -> None:
    raw, _ = from_mftcoder(
        _mftcoder(tokenize_mode="pretrain", role_markers={"system": "S", "user": "U", "assistant": "A"})
    )
    assert raw["data"]["train_on"] == "all"
    assert raw["data"]["template"]["role_markers"] == {"system": "", "user": "", "assistant": ""}


def test_sst_mode_reads_every_task_as_text() -> None:
    raw, _ = from_mftcoder(_mftcoder(tokenize_mode="sst"))
    assert {task["format"] for task in raw["data"]["tasks"]} == {"text"}


def test_other_mappings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _mftcoder(
        target_modules="q_proj",
        lr_scheduler_type="cosine_with_restarts",
        coba_sample_valid_num=2,
        per_device_eval_batch_size=4,
        resume_from_checkpoint="out/step_100",
    )
    cfg = _load(tmp_path, monkeypatch, raw)
    assert cfg.finetune.lora.target_modules == ["q_proj"]
    assert cfg.train.lr_schedule == "cosine"  # one cycle of cosine_with_restarts is a cosine
    assert cfg.coba.probe_batches == 8
    assert cfg.train.resume == str(tmp_path / "out" / "step_100")  # from the working folder


def test_notes_say_what_has_no_effect_and_what_differs() -> None:
    _, notes = from_mftcoder(_mftcoder(data_weights="[1,2]", world_size=8))
    text = "\n".join(notes)
    for key in ("tb_dir", "model_type", "world_size", "data_weights"):
        assert any(note.startswith(f"{key}: no effect (") for note in notes), key
    assert "trust_remote_code: MFTCoder always runs a checkpoint's own code" in text
    assert "seq_length → data.max_seq_len (differs: data.max_seq_len is seq_length + 1" in text
    assert "one process" in text


def test_load_logs_the_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _load(tmp_path, monkeypatch, _mftcoder())
    assert "MFTCoder config" in caplog.text
    assert "tb_dir: no effect" in caplog.text and "data_paths → data.tasks" in caplog.text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"task_weights": "[1,2,3]"}, "task_weights: 3 entries for 2 data_paths"),
        ({"padding_mode": "window"}, "padding_mode: 'window' is not one of 'padding', 'pack', 'concat'"),
        ({"weighted_loss_mode_": "case1"}, "did you mean 'weighted_loss_mode'?"),
        ({"data_split": "98;2"}, "data_split"),
        ({"peft_type": "prefix"}, "peft_type"),
        ({"weighted_loss_mode": "selfpaced"}, "'selfpaced' is not offered by mftune"),
        ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type: 'polynomial' is not one of"),
        ({"xxpo": "dpo", "beta": 0.1}, "preference-training (DPO/ORPO) config (key 'xxpo')"),
    ],
)
def test_errors(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mftcoder(_mftcoder(**extra))
    assert message in str(info.value)
    assert "\n" not in str(info.value)  # one line


def test_mftune_sections_may_be_mixed_in() -> None:
    raw, _ = from_mftcoder(_mftcoder(seq_length=512, data={"max_seq_len": 256, "packing": "none"}))
    assert raw["data"]["max_seq_len"] == 256 and raw["data"]["packing"] == "none"
    assert len(raw["data"]["tasks"]) == 2


def test_shipped_example_loads_from_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "mftcoder_compat.json")
    assert list(cfg.data.tasks) == ["arithmetic", "list_ops", "write_function", "write_test"]
    for task in cfg.data.tasks.values():
        assert Path(task.path).parent == REPO / "examples" / "data"
    assert cfg.model.name_or_path == str(REPO / "runs" / "tiny-llama")


def _mftcoder_lr(step: int, *, peak: float, floor: float, warmup: int, total: int) -> float:
    """MFTCoder's rate at optimizer step `step` (one process, no accumulation), as its trainer computes it:
    transformers' cosine with warm-up (step / warmup; then 0.5 (1 + cos(pi progress))), and after each
    scheduler step any rate below min_lr set to min_lr."""
    if step < warmup:
        factor = step / warmup
    else:
        factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return max(peak * factor, floor)


def test_the_schedule_is_mftcoders() -> None:
    peak, floor, warmup, total = 5e-5, 5e-6, 10, 100
    for step in (1, 2, 5, 9, 10, 11, 50, 90, 99):
        mftune = peak * lr_factor(step, total, warmup, "cosine", floor / peak, "floor")
        assert mftune == pytest.approx(
            _mftcoder_lr(step, peak=peak, floor=floor, warmup=warmup, total=total), rel=1e-12
        )
    # Below the floor in warm-up (step 1: 5e-6 ... ) and at the end of the decay, the floor holds.
    assert peak * lr_factor(99, total, warmup, "cosine", floor / peak, "floor") == pytest.approx(floor)
    assert peak * lr_factor(0, total, warmup, "cosine", floor / peak, "floor") == pytest.approx(floor)
