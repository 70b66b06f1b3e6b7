"""On a CUDA GPU: the chunked loss against full-logit cross entropy, and bf16 training runs of every
method (QLoRA through bitsandbytes' CUDA kernels). Run with `pytest -m gpu`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from mftune.cli import main
from mftune.loss.cross_entropy import lm_head_loss
from mftune.train.tracking import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def test_chunked_loss_equals_full_logit_cross_entropy_in_bf16() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 32000, bias=False, dtype=torch.bfloat16, device=CUDA)
    hidden = torch.randn(5000, 256, dtype=torch.bfloat16, device=CUDA, requires_grad=True)
    targets = torch.randint(0, 32000, (5000,), device=CUDA)
    weights = torch.rand(5000, device=CUDA)  # per-token coefficients, as the loss strategies give

    loss, correct = lm_head_loss(head, hidden, targets, chunk_size=2048)
    (loss * weights).sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    logits = head(hidden).float()  # the same bf16 matmul, upcast before the softmax as mftune does
    reference = F.cross_entropy(logits, targets, reduction="none")
    (reference * weights).sum().backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(correct, logits.argmax(-1) == targets)
    for got, want in zip(grads, (hidden.grad, head.weight.grad), strict=True):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_bf16_training_runs_on_cuda(method: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model_dir), "dtype": "bfloat16"},
                "finetune": {"method": method, "lora": {"r": 8, "alpha": 16}},
                "data": {
                    "tasks": {
                        "arithmetic": {"path": str(EXAMPLES / "arithmetic")},
                        "write_test": {"path": str(EXAMPLES / "write_test")},
                    },
                    "max_seq_len": 256,
                    "cache_dir": str(tmp_path / "cache"),
                    "num_proc": 1,
                    "max_valid_samples": 8,
                },
                "train": {
                    "output_dir": str(tmp_path / "run"),
                    "learning_rate": 3e-3,
                    "max_steps": 6,
                    "global_batch_size": 4,
                    "micro_batch_size": 2,
                    "log_every": 1,
                    "eval_every": 100,
                    "tensorboard": False,
                    "plots": False,
                },
            }
        )
    )
    assert main(["train", str(config)]) == 0
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in steps)
    assert all(r["train/max_memory_gib"] > 0 for r in steps)
    valid = [r["valid/loss"] for r in rows if "valid/loss" in r]
    assert valid[-1] < valid[0]  # before training, after 6 steps
    if method != "full":
        adapter = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
        assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
        merged = tmp_path / "merged"
        assert main(["merge", str(tmp_path / "run" / "final"), "--out", str(merged)]) == 0
        assert "quantization_config" not in json.loads((merged / "config.json").read_text())
