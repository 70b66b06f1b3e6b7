"""Model loading, LoRA targets and training, and the backbone path the loss uses (packed == unpacked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mftune.config.schema import FinetuneConfig, LoraConfig, ModelConfig
from mftune.data.collate import IGNORE_INDEX, Sample, collate_rows
from mftune.model import (
    hidden_states,
    load_model,
    lora_target_modules,
    output_head,
    resolve_attention,
    resolve_dtype,
)
from mftune.model.hidden import model_config
from mftune.tiny import TINY_ARCHITECTURES, build_tiny_model

CPU = torch.device("cpu")
EXPECTED_TARGETS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """One tiny model folder per architecture."""
    return {
        arch: build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, tokenizer_dir=tokenizer_dir)
        for arch in TINY_ARCHITECTURES
    }


def _load(model_dir: Path, method: str = "lora", checkpointing: str = "off", **lora) -> nn.Module:
    torch.manual_seed(0)
    model_cfg = ModelConfig(name_or_path=str(model_dir), gradient_checkpointing=checkpointing)
    finetune_cfg = FinetuneConfig(method=method, lora=LoraConfig(r=4, alpha=8, **lora))
    return load_model(model_cfg, finetune_cfg, device=CPU)


def _sample(length: int, sample_id: int, seed: int) -> Sample:
    ids = np.random.default_rng(seed).integers(10, 4000, length).astype(np.int32)
    return Sample(ids, np.ones(length, dtype=bool), task_id=0, sample_id=sample_id)


def test_resolve_dtype_and_attention() -> None:
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("float32", CPU) == torch.float32
    with pytest.warns(UserWarning, match="CPU"):
        assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_attention("auto", CPU) == "sdpa"
    assert resolve_attention("eager", CPU) == "eager"
    with pytest.warns(UserWarning, match="varlen"):
        assert resolve_attention("varlen", CPU) == "mftune_varlen"


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_lora_targets_are_every_linear_layer_but_the_head(arch: str, arch_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(arch_dirs[arch])
    targets = lora_target_modules(model)
    assert set(targets) == EXPECTED_TARGETS[arch]
    assert len(targets) == len(set(targets))
    wrapped = _load(arch_dirs[arch])
    lora_layers = {name.rsplit(".", 1)[-1] for name, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert lora_layers == EXPECTED_TARGETS[arch]


def test_lora_targets_skip_a_tied_head(tmp_path: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path, "llama", tokenizer_dir=tokenizer_dir, tie_word_embeddings=True)
    assert set(lora_target_modules(AutoModelForCausalLM.from_pretrained(path))) == EXPECTED_TARGETS["llama"]


def test_a_layer_named_like_the_head_is_targeted_by_full_name() -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.ModuleDict({"lm_head": nn.Linear(2, 2), "proj": nn.Linear(2, 2)})
            self.lm_head = nn.Linear(2, 2)

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

    assert lora_target_modules(Toy()) == ["block.lm_head", "proj"]


def test_explicit_targets(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir, target_modules=["q_proj", "self_attn.v_proj"])
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match=r"'qproj'.*match no module.*q_proj, k_proj"):
        _load(tiny_model_dir, target_modules=["q_proj", "qproj"])


def test_full_and_training_settings(tiny_model_dir: Path) -> None:
    full = _load(tiny_model_dir, method="full")
    assert type(full).__name__ == "LlamaForCausalLM"
    assert all(p.requires_grad for p in full.parameters())
    assert full.config.use_cache is False
    assert not full.is_activation_checkpointing  # auto: off for a tiny model
    lora = _load(tiny_model_dir, checkpointing="on")
    assert lora.get_base_model().is_activation_checkpointing
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize(
    ("adapter_dtype", "expected"), [("float32", torch.float32), ("model", torch.bfloat16)]
)
def test_adapter_dtype(tiny_model_dir: Path, adapter_dtype: str, expected: torch.dtype) -> None:
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16", gradient_checkpointing="off")
    lora = LoraConfig(r=4, alpha=8, adapter_dtype=adapter_dtype)
    with pytest.warns(UserWarning, match="CPU"):
        model = load_model(model_cfg, FinetuneConfig(method="lora", lora=lora), device=CPU)
    adapters = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and set(adapters.values()) == {expected}
    frozen = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert frozen == {torch.bfloat16}
    batch = collate_rows([[_sample(5, 0, 3), _sample(6, 1, 4)]], pad_id=0)
    hidden = hidden_states(model, batch, packed=True)
    hidden.float().square().mean().backward()
    assert all(
        p.grad is not None and p.grad.dtype == expected for n, p in model.named_parameters() if "lora_B" in n
    )


def test_qlora_needs_bitsandbytes_that_runs_on_the_device(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.machinery
    import sys
    import types

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ImportError, match=r"mftune\[gpu\]"):
        _load(tiny_model_dir, method="qlora")
    # Releases before the device registry (CUDA only), and the first to list the CPU, which
    # cannot run 4-bit weights packed in bf16 there.
    for version, devices in [("0.45.5", None), ("0.46.1", {"cpu", "cuda"})]:
        old = types.ModuleType("bitsandbytes")
        old.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
        old.__version__ = version
        if devices:
            old.supported_torch_devices = devices
        monkeypatch.setitem(sys.modules, "bitsandbytes", old)
        with pytest.raises(ImportError, match=rf">= 0\.47: not on cpu with bitsandbytes {version}"):
            _load(tiny_model_dir, method="qlora")


@pytest.mark.parametrize(("method", "checkpointing"), [("lora", "on"), ("dora", "off")])
def test_training_changes_adapters_only(tiny_model_dir: Path, method: str, checkpointing: str) -> None:
    model = _load(tiny_model_dir, method=method, checkpointing=checkpointing)
    model.train()
    batch = collate_rows([[_sample(6, 0, 1), _sample(9, 1, 2)]], pad_id=0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # LoRA B starts at zero, so A only gets a gradient from the second step on.
    for _ in range(3):
        logits = output_head(model)(hidden_states(model, batch, packed=True))
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    adapter_keys = {k for k in before if "lora_" in k}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == adapter_keys
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert any("lora_magnitude_vector" in k for k in changed) == (method == "dora")


def test_hidden_states_are_the_backbones_with_adapters_active_and_no_logits(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    batch = collate_rows([[_sample(5, 0, 3)], [_sample(8, 1, 4)]], pad_id=0)  # padded: packing none
    head_inputs: list[torch.Size] = []
    hook = output_head(model).register_forward_hook(lambda _m, args, _out: head_inputs.append(args[0].shape))
    with torch.no_grad():
        hidden = hidden_states(model, batch, packed=False)
        assert head_inputs == [torch.Size([2, 0, 64])]  # no full-vocabulary logits
        hook.remove()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        decoder = model.get_base_model().model  # LoRA layers sit inside it, injected in place
        torch.testing.assert_close(hidden, decoder(**inputs).last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(output_head(model)(hidden), model(**inputs).logits, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            without_adapter = hidden_states(model, batch, packed=False)
    assert (hidden - without_adapter).abs().max() > 1e-2


def test_hidden_states_through_ddp(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    model = _load(tiny_model_dir)
    batch = collate_rows([[_sample(5, 0, 3), _sample(6, 1, 4)]], pad_id=0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert output_head(wrapped) is output_head(model)
        # DDP has no `config`: the loss reads logit scaling and MoE settings through the wrapper.
        assert getattr(wrapped, "config", None) is None
        assert model_config(wrapped) is model.config
        hidden = hidden_states(wrapped, batch, packed=True)
        output_head(wrapped)(hidden).square().mean().backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(hidden, hidden_states(model, batch, packed=True))
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_equals_unpacked(arch: str, attention: str, arch_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(arch_dirs[arch], attn_implementation=attention).eval()
    first, second = _sample(5, 0, 5), _sample(7, 1, 6)
    with torch.no_grad():
        alone = [
            hidden_states(model, collate_rows([[s]], pad_id=0), packed=False)[0] for s in (first, second)
        ]
        packed = hidden_states(model, collate_rows([[first, second]], pad_id=0, pad_to=15), packed=True)[0]
        padded = hidden_states(model, collate_rows([[first], [second]], pad_id=0), packed=False)
        # Control: the same row with the samples attending to each other differs.
        contiguous = collate_rows([[first, second]], pad_id=0, isolated=False)
        leaky = hidden_states(model, contiguous, packed=True)[0]
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(packed[:5], alone[0], **tol)
    torch.testing.assert_close(packed[5:12], alone[1], **tol)
    torch.testing.assert_close(padded[0, :5], alone[0], **tol)
    torch.testing.assert_close(padded[1], alone[1], **tol)
    assert (leaky[5:12] - alone[1]).abs().max() > 1e-2
