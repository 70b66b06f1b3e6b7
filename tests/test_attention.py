"""The `mftune_varlen` attention backend: equal to sdpa's packed masking and to samples run alone,
segments from the collator, the arguments each kernel gets, and when `auto` picks it."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mftune.config.errors import MissingPackageError
from mftune.config.schema import FinetuneConfig, LoraConfig, ModelConfig
from mftune.data.collate import Sample, collate_rows
from mftune.model import attention, hidden_states, load_model, resolve_attention
from mftune.model.attention import VARLEN_ATTENTION, register_varlen_attention, varlen_attention
from mftune.model.hidden import model_config
from mftune.tiny import build_tiny_model
from mftune.train.tracking import read_metrics

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
TOL = {"atol": 1e-5, "rtol": 1e-5}
# Two packed rows of 3 and 2 samples (16 and 14 tokens), padded to 20 tokens when packed.
ROWS = [[(5, 0), (7, 1), (4, 2)], [(6, 3), (8, 4)]]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """Tiny llama and qwen2 (both with grouped-query attention: 4 query, 2 key/value heads)."""
    return {
        arch: build_tiny_model(tmp_path_factory.mktemp(f"varlen-{arch}"), arch, tokenizer_dir=tokenizer_dir)
        for arch in ("llama", "qwen2")
    }


def _sample(length: int, sample_id: int) -> Sample:
    ids = np.random.default_rng(sample_id).integers(10, 4000, length).astype(np.int32)
    return Sample(ids, np.ones(length, dtype=bool), task_id=0, sample_id=sample_id)


def _packed_rows() -> list[list[Sample]]:
    return [[_sample(n, i) for n, i in row] for row in ROWS]


def _model(path: Path, attn: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)


def _loss_weights(hidden: torch.Tensor) -> torch.Tensor:
    return torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))


def _forward_backward(model: nn.Module, batch: dict, *, packed: bool) -> tuple[torch.Tensor, dict]:
    """Hidden states and the gradient of a fixed linear function of the real tokens' hidden states."""
    model.zero_grad()
    hidden = hidden_states(model, batch, packed=packed)
    real = batch["attention_mask"].bool()
    (hidden * _loss_weights(hidden))[real].sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), grads


def _assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    # Gradients sum many tokens' contributions: compare to the tensor's scale, as fp32 summation order allows.
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-5, msg=name)


def test_collator_segments_cover_the_padded_batch() -> None:
    rows = [[_sample(3, 0), _sample(2, 1)], [_sample(4, 2)]]
    batch = collate_rows(rows, pad_id=0)  # width 5: the second row has one padding token
    assert batch["varlen_cu_seqlens"].dtype == torch.int32
    assert batch["varlen_cu_seqlens"].tolist() == [0, 3, 5, 10]
    assert batch["varlen_max_seqlen"] == 5
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9]  # real tokens only, unchanged
    padded = collate_rows(rows, pad_id=0, pad_to=7)
    assert padded["varlen_cu_seqlens"].tolist() == [0, 3, 7, 14]
    assert padded["varlen_max_seqlen"] == 7
    contiguous = collate_rows(rows, pad_id=0, isolated=False)
    assert "varlen_cu_seqlens" not in contiguous and "varlen_max_seqlen" not in contiguous


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_varlen_equals_sdpa_packed_and_samples_alone(arch: str, arch_dirs: dict[str, Path]) -> None:
    varlen = _model(arch_dirs[arch], register_varlen_attention())
    sdpa = _model(arch_dirs[arch], "sdpa")
    rows = _packed_rows()
    batch = collate_rows(rows, pad_id=0, pad_to=20)
    hidden, grads = _forward_backward(varlen, batch, packed=True)
    masked_hidden, masked_grads = _forward_backward(sdpa, batch, packed=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], masked_hidden[real], **TOL)
    _assert_grads_close(grads, masked_grads)

    # Padded rows (packing none) take the same path: one segment per row, its padding last.
    padded = collate_rows([[sample] for row in rows for sample in row], pad_id=0)
    with torch.no_grad():
        got, want = (hidden_states(m, padded, packed=False) for m in (varlen, sdpa))
    torch.testing.assert_close(
        got[padded["attention_mask"].bool()], want[padded["attention_mask"].bool()], **TOL
    )

    # Each sample alone, with the slice of the same loss weights its tokens had in the packed batch.
    weights = _loss_weights(hidden)
    sdpa.zero_grad()
    for b, row in enumerate(rows):
        offset = 0
        for sample in row:
            n = len(sample.input_ids)
            alone = hidden_states(sdpa, collate_rows([[sample]], pad_id=0), packed=False)[0]
            torch.testing.assert_close(hidden[b, offset : offset + n], alone.detach(), **TOL)
            (alone * weights[b, offset : offset + n]).sum().backward()
            offset += n
    alone_grads = {name: p.grad for name, p in sdpa.named_parameters() if p.grad is not None}
    assert len(alone_grads) > 10  # all but the unused output head
    _assert_grads_close(grads, alone_grads)


def test_collator_segments_reach_every_layer_through_peft(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.warns(UserWarning, match="reference kernel"):
        model = load_model(
            ModelConfig(name_or_path=str(tiny_model_dir), attention="varlen"),
            FinetuneConfig(method="lora", lora=LoraConfig(r=4, alpha=8)),
            device=CPU,
            packing="isolated",
        )
    assert attention.uses_varlen_attention(model_config(model))
    batch = collate_rows(_packed_rows(), pad_id=0, pad_to=20)
    seen: list[tuple[list[int], int]] = []

    def spy(query, key, value, cu_seqlens, max_seqlen, **kwargs):
        seen.append((cu_seqlens.tolist(), max_seqlen))
        return varlen_attention(query, key, value, cu_seqlens, max_seqlen, **kwargs)

    def derive(*args):
        raise AssertionError("segments were derived in a layer instead of taken from the batch")

    monkeypatch.setattr(attention, "varlen_attention", spy)
    monkeypatch.setattr(attention, "_segments_from_positions", derive)
    for packed in (True, False):  # padded rows (packing none) take the same path
        seen.clear()
        hidden_states(model, batch, packed=packed)
        expected = (batch["varlen_cu_seqlens"].tolist(), batch["varlen_max_seqlen"])
        assert seen == [expected] * model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_without_segments_it_follows_the_mask_or_the_position_ids(
    arch: str, arch_dirs: dict[str, Path]
) -> None:
    """A model called directly (no `cu_seq_lens_q`) attends as sdpa does with the same inputs."""
    varlen = _model(arch_dirs[arch], register_varlen_attention()).eval()
    sdpa = _model(arch_dirs[arch], "sdpa").eval()
    batch = collate_rows(_packed_rows(), pad_id=0, pad_to=20)
    padded = collate_rows([[_sample(5, 0)], [_sample(9, 1)]], pad_id=0)
    real = batch["attention_mask"].bool()
    calls = {
        "packed position ids": ({"position_ids": batch["position_ids"]}, real),
        "padding mask": ({"attention_mask": padded["attention_mask"]}, padded["attention_mask"].bool()),
        "plain causal rows": ({}, torch.ones_like(real)),
    }
    for name, (kwargs, keep) in calls.items():
        input_ids = padded["input_ids"] if name == "padding mask" else batch["input_ids"]
        with torch.no_grad():
            # No cache: with one, transformers would not look for packed rows in the position ids.
            got = varlen.model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
            want = sdpa.model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
        torch.testing.assert_close(got[keep], want[keep], **TOL, msg=name)


def _torch_kernel_recorder(calls: list[dict], *, with_gqa_flag: bool):
    """A stand-in for torch's `varlen_attn` that checks its arguments and returns the reference result."""

    def check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa):
        assert query.dim() == key.dim() == 3 and query.shape[1] == 4 and key.shape[1] == value.shape[1] == 2
        assert cu_seq_q.dtype == torch.int32 and cu_seq_k is cu_seq_q
        assert isinstance(max_q, int) and max_q == max_k
        assert window_size == (-1, 0)
        calls.append({"scale": scale, "enable_gqa": enable_gqa, "cu": cu_seq_q.tolist(), "max": max_q})
        return attention._reference_attention(query, key, value, cu_seq_q, scale=scale, dropout=0.0)

    if with_gqa_flag:  # torch 2.13's signature

        def varlen_attn(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            *,
            return_aux=None,
            scale=None,
            window_size=(-1, -1),
            enable_gqa=False,
        ):
            return check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa)
    else:  # torch 2.11's, which takes fewer key/value heads as they are

        def varlen_attn(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            *,
            return_aux=None,
            scale=None,
            window_size=(-1, -1),
        ):
            return check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, None)

    return varlen_attn


@pytest.mark.parametrize("with_gqa_flag", [True, False])
def test_torch_kernel_gets_unrepeated_heads_causal_window_and_int32_offsets(
    with_gqa_flag: bool, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tiny_model_dir, register_varlen_attention())
    batch = collate_rows(_packed_rows(), pad_id=0, pad_to=20)
    with torch.no_grad():
        reference = hidden_states(model, batch, packed=True)
    calls: list[dict] = []
    recorder = _torch_kernel_recorder(calls, with_gqa_flag=with_gqa_flag)
    monkeypatch.setattr(attention, "_kernel_name", lambda query: "torch")
    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: recorder)
    with torch.no_grad():
        hidden = hidden_states(model, batch, packed=True)
    torch.testing.assert_close(hidden, reference, atol=0, rtol=0)
    expected = {
        "scale": model.model.layers[0].self_attn.scaling,
        "enable_gqa": True if with_gqa_flag else None,
        "cu": batch["varlen_cu_seqlens"].tolist(),
        "max": batch["varlen_max_seqlen"],
    }
    assert calls == [expected] * model.config.num_hidden_layers
    q, k = torch.randn(6, 4, 8), torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="dropout"):
        varlen_attention(q, k, k, torch.tensor([0, 6], dtype=torch.int32), 6, dropout=0.1)


def test_flash_attn_kernel_gets_unrepeated_heads_and_causal(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False
    ):
        calls.append({"heads": (q.shape[1], k.shape[1]), "causal": causal, "dropout": dropout_p})
        calls[-1] |= {"scale": softmax_scale, "cu": (cu_q.dtype, cu_q is cu_k), "max": (max_q, max_k)}
        return attention._reference_attention(q, k, v, cu_q, scale=softmax_scale, dropout=0.0)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)
    )
    monkeypatch.setattr(attention, "_kernel_name", lambda query: "flash_attn")
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9])
    out = varlen_attention(q, k, v, cu, 5, scale=0.3, dropout=0.1)
    assert out.shape == q.shape
    assert calls == [
        {
            "heads": (4, 2),
            "causal": True,
            "dropout": 0.1,
            "scale": 0.3,
            "cu": (torch.int32, True),
            "max": (5, 5),
        }
    ]


def test_reference_kernel_is_causal_attention_inside_each_segment() -> None:
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    out = varlen_attention(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), 5, scale=0.3)
    for start, end in ((0, 4), (4, 9)):
        qs, ks, vs = (
            x[start:end].transpose(0, 1) for x in (q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
        )
        scores = (qs @ ks.transpose(1, 2) * 0.3).masked_fill(
            torch.ones(end - start, end - start).triu(1).bool(), -torch.inf
        )
        torch.testing.assert_close(out[start:end], (scores.softmax(-1) @ vs).transpose(0, 1), **TOL)
    with pytest.raises(ValueError, match="segments span"):
        varlen_attention(q, k, v, torch.tensor([0, 4, 8], dtype=torch.int32), 4)


def test_compute_dtype_of_an_attention_layer() -> None:
    """What float32 activations are cast to before a CUDA kernel (norms kept in float32 by peft)."""
    layer = nn.Module()
    layer.q_proj = nn.Linear(4, 4, dtype=torch.bfloat16)
    assert attention._compute_dtype(layer) == torch.bfloat16
    layer.config = types.SimpleNamespace(_is_quantized=True, dtype=torch.float16)
    assert attention._compute_dtype(layer) == torch.float16
    assert attention._compute_dtype(nn.Module()) is None


def test_unsupported_features_are_refused() -> None:
    module = nn.Module()
    module.is_causal = True
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    forward = attention.varlen_attention_forward
    with pytest.raises(ValueError, match="sliding-window"):
        forward(module, q, k, k, None, sliding_window=4)
    out, _ = forward(module, q, k, k, None, sliding_window=5)  # no segment outgrows the window
    assert out.shape == (1, 5, 4, 8)
    with pytest.raises(ValueError, match="KV cache"):
        forward(module, q[:, :, :1], k, k, None)
    with pytest.raises(ValueError, match="4-D"):
        forward(module, q, k, k, torch.zeros(1, 1, 5, 5))
    module.is_causal = False
    with pytest.raises(ValueError, match="non-causal"):
        forward(module, q, k, k, None)


def test_resolve_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert not attention.cuda_varlen_kernel_available(CPU)
    for packing in ("isolated", "none", "contiguous"):
        assert resolve_attention("auto", CPU, packing=packing, dtype=torch.float32) == "sdpa"
    for name in ("sdpa", "eager", "flex_attention"):
        assert resolve_attention(name, CPU, packing="isolated") == name
    if importlib.util.find_spec("flash_attn") is None:  # named, it needs the package
        with pytest.raises(MissingPackageError, match="needs flash_attn"):
            resolve_attention("flash_attention_2", CPU, packing="isolated")
    with pytest.warns(UserWarning, match="reference kernel"):
        assert resolve_attention("varlen", CPU, packing="isolated") == VARLEN_ATTENTION
    assert register_varlen_attention() == VARLEN_ATTENTION  # again: the same entries
    assert ALL_ATTENTION_FUNCTIONS[VARLEN_ATTENTION] is attention.varlen_attention_forward
    assert VARLEN_ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS

    # A CUDA device with a varlen kernel, faked: auto picks varlen for isolated packing in half precision only.
    monkeypatch.setattr(
        "mftune.model.load.cuda_varlen_kernel_available", lambda device: device.type == "cuda"
    )
    assert resolve_attention("auto", CUDA, packing="isolated", dtype=torch.bfloat16) == VARLEN_ATTENTION
    assert resolve_attention("auto", CUDA, packing="isolated", dtype=torch.float16) == VARLEN_ATTENTION
    assert resolve_attention("auto", CUDA, packing="isolated", dtype=torch.float32) == "sdpa"
    assert resolve_attention("auto", CUDA, packing="none", dtype=torch.bfloat16) == "sdpa"
    assert resolve_attention("auto", CUDA, packing="contiguous", dtype=torch.bfloat16) == "sdpa"
    assert resolve_attention("auto", CUDA, dtype=torch.bfloat16) == "sdpa"  # packing unknown
    assert resolve_attention("varlen", CUDA, packing="none", dtype=torch.bfloat16) == VARLEN_ATTENTION
    monkeypatch.setattr("mftune.model.load.cuda_varlen_kernel_available", lambda device: False)
    assert resolve_attention("auto", CUDA, packing="isolated", dtype=torch.bfloat16) == "sdpa"


@pytest.mark.parametrize(
    ("capability", "torch_flash", "flash_attn", "kernel"),
    [
        ((9, 0), True, True, "torch"),
        ((9, 0), False, True, "flash_attn"),
        ((9, 0), False, False, None),
        ((7, 0), True, True, None),  # before Ampere neither kernel runs
    ],
)
def test_cuda_kernel_choice(
    capability: tuple[int, int], torch_flash: bool, flash_attn: bool, kernel: str | None, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: torch_flash)
    monkeypatch.setattr(attention, "_flash_attn_installed", lambda: flash_attn)
    attention._cuda_kernel.cache_clear()
    try:
        assert attention._cuda_kernel(0) == kernel
    finally:
        attention._cuda_kernel.cache_clear()
    assert attention._kernel_name(torch.empty(1)) == "reference"  # a CPU tensor


def test_training_with_varlen_equals_training_with_sdpa(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mftune.config import load_config
    from mftune.train.loop import train

    calls: list[int] = []

    def spy(query, *args, **kwargs):
        calls.append(query.shape[0])
        return varlen_attention(query, *args, **kwargs)

    monkeypatch.setattr(attention, "varlen_attention", spy)

    examples = Path(__file__).resolve().parents[1] / "examples" / "data"
    raw = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "finetune": {"method": "lora"},
        "data": {
            "tasks": {name: {"path": str(examples / name)} for name in ("write_test", "write_function")},
            "packing": "isolated",
            "max_seq_len": 128,
            "cache_dir": str(tmp_path / "cache"),
            "num_proc": 1,
            "max_valid_samples": 8,
        },
        "train": {
            "max_steps": 2,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "log_every": 1,
            "eval_every": 2,
            "save_every": 100,
            "tensorboard": False,
            "plots": False,
        },
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    logged = {}
    for name in ("sdpa", "varlen"):
        out = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # varlen's reference-kernel warning on the CPU
            train(load_config(config, [f"model.attention={name}", f"train.output_dir={out}"]))
        logged[name] = read_metrics(out)
        assert bool(calls) == (name == "varlen")
    steps = [(a, b) for a, b in zip(logged["sdpa"], logged["varlen"], strict=True) if "train/loss" in a]
    assert len(steps) == 2
    for a, b in steps:
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    assert logged["varlen"][-1]["valid/loss"] == pytest.approx(logged["sdpa"][-1]["valid/loss"], rel=1e-5)
