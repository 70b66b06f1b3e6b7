"""`mftune_varlen` on a CUDA GPU: its CUDA kernel in bfloat16 against sdpa on each sample alone, and a
training run that `model.attention: auto` sends through it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mftune.config import load_config
from mftune.data.collate import Sample, collate_rows
from mftune.model import attention, hidden_states, resolve_attention
from mftune.model.attention import VARLEN_ATTENTION, cuda_varlen_kernel_available, register_varlen_attention
from mftune.train.tracking import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture
def cuda_kernel() -> str:
    """The CUDA varlen kernel bfloat16 runs on this GPU; skips where there is none."""
    if not cuda_varlen_kernel_available(CUDA):
        pytest.skip("no CUDA varlen kernel (torch's or flash-attn's) on this GPU")
    kernel = attention._kernel_name(torch.empty(1, dtype=torch.bfloat16, device=CUDA))
    assert kernel in ("torch", "flash_attn")
    return kernel


def _sample(length: int, sample_id: int) -> Sample:
    ids = np.random.default_rng(sample_id).integers(10, 4000, length).astype(np.int32)
    return Sample(ids, np.ones(length, dtype=bool), task_id=0, sample_id=sample_id)


def _model(path: Path, attn: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(CUDA)


def _on_cuda(batch: dict) -> dict:
    return {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in batch.items()}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_varlen_matches_samples_alone_in_bf16(tiny_model_dir: Path, cuda_kernel: str) -> None:
    rows = [[_sample(37, 0), _sample(80, 1), _sample(11, 2)], [_sample(64, 3), _sample(45, 4)]]
    batch = _on_cuda(collate_rows(rows, pad_id=0, pad_to=136))
    weights = torch.randn(2, 136, 64, generator=torch.Generator().manual_seed(0)).to(CUDA)
    real = batch["attention_mask"].bool()

    varlen = _model(tiny_model_dir, register_varlen_attention(), torch.bfloat16)
    hidden = hidden_states(varlen, batch, packed=True)
    (hidden.float() * weights)[real].sum().backward()
    hidden, grads = hidden.detach()[real].float(), _grads(varlen)

    # The same samples one at a time through sdpa, in bfloat16 and in float32 (the reference).
    alone: dict[torch.dtype, torch.Tensor] = {}
    alone_grads: dict[torch.dtype, dict[str, torch.Tensor]] = {}
    for dtype in (torch.bfloat16, torch.float32):
        sdpa = _model(tiny_model_dir, "sdpa", dtype)
        pieces = []
        for b, row in enumerate(rows):
            offset = 0
            for sample in row:
                n = len(sample.input_ids)
                out = hidden_states(sdpa, _on_cuda(collate_rows([[sample]], pad_id=0)), packed=False)[0]
                (out.float() * weights[b, offset : offset + n]).sum().backward()
                pieces.append(out.detach().float())
                offset += n
        alone[dtype], alone_grads[dtype] = torch.cat(pieces), _grads(sdpa)

    reference, reference_grads = alone[torch.float32], alone_grads[torch.float32]
    # Within bfloat16 rounding: about as far from float32 as sdpa's own bfloat16 result is.
    sdpa_error = _relative_error(alone[torch.bfloat16], reference)
    assert _relative_error(hidden, reference) < 2 * sdpa_error + 5e-3
    assert _relative_error(hidden, reference) < 2e-2
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert _relative_error(grad, reference_grads[name]) < 5e-2, name


def test_training_runs_through_the_cuda_kernel(
    tmp_path: Path, tiny_model_dir: Path, cuda_kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mftune.train.loop import train

    # What `auto` means for this run: isolated packing (the default) in bfloat16 on this GPU.
    assert resolve_attention("auto", CUDA, packing="isolated", dtype=torch.bfloat16) == VARLEN_ATTENTION
    kernels: list[str] = []
    run_kernel = attention.varlen_attention

    def spy(query, *args, **kwargs):
        kernels.append(attention._kernel_name(query))
        return run_kernel(query, *args, **kwargs)

    monkeypatch.setattr(attention, "varlen_attention", spy)
    raw = {
        "model": {"name_or_path": str(tiny_model_dir), "attention": "auto", "dtype": "bfloat16"},
        "finetune": {"method": "lora"},
        "data": {
            "tasks": {
                "write_test": {"path": str(EXAMPLES / "write_test")},
                "write_function": {"path": str(EXAMPLES / "write_function")},
            },
            "packing": "isolated",
            "max_seq_len": 128,
            "cache_dir": str(tmp_path / "cache"),
            "num_proc": 1,
            "max_valid_samples": 8,
        },
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 1,
            "global_batch_size": 2,
            "micro_batch_size": 1,
            "log_every": 1,
            "eval_every": 100,
            "save_every": 100,
            "tensorboard": False,
            "plots": False,
        },
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    train(load_config(config))
    assert kernels and set(kernels) == {cuda_kernel}
    logged = read_metrics(tmp_path / "run")
    losses = [m["train/loss"] for m in logged if "train/loss" in m]
    assert len(losses) == 1 and math.isfinite(losses[0])
