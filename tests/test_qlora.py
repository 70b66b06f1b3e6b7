"""QLoRA on the CPU: a quantised base in bf16, a training run, and merge into the unquantised base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

bnb = pytest.importorskip("bitsandbytes")

from safetensors.torch import load_file  # noqa: E402

from mftune.cli import main  # noqa: E402
from mftune.config.schema import FinetuneConfig, LoraConfig, ModelConfig, QloraConfig  # noqa: E402
from mftune.data.collate import Sample, collate_rows  # noqa: E402
from mftune.export import merge_adapter  # noqa: E402
from mftune.model import load_model  # noqa: E402
from mftune.model.load import _check_bitsandbytes_runs_on  # noqa: E402
from mftune.train.step import token_losses  # noqa: E402
from mftune.train.tracking import read_metrics  # noqa: E402

CPU = torch.device("cpu")
try:
    _check_bitsandbytes_runs_on(CPU)
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)

pytestmark = [
    pytest.mark.filterwarnings("ignore:bfloat16 on CPU"),
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
SCALE = 2.0  # LoRA alpha / r below


def _load(model_dir: Path, **qlora) -> torch.nn.Module:
    torch.manual_seed(0)
    model_cfg = ModelConfig(name_or_path=str(model_dir), dtype="bfloat16", gradient_checkpointing="on")
    finetune_cfg = FinetuneConfig(method="qlora", lora=LoraConfig(r=4, alpha=8), qlora=QloraConfig(**qlora))
    return load_model(model_cfg, finetune_cfg, device=CPU)


def _unquantised_weights(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if "lora_" not in n and "_proj" not in n}


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_4bit_base_keeps_bf16_weights_and_trains_adapters_only(
    tiny_model_dir: Path, quant_type: str, double_quant: bool
) -> None:
    model = _load(tiny_model_dir, quant_type=quant_type, double_quant=double_quant)
    config = model.config.quantization_config
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (quant_type, double_quant)
    adapted = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == TARGETS
    for layer in adapted.values():
        weight = layer.base_layer.weight
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and weight.quant_storage == torch.bfloat16
        assert (weight.quant_type, weight.quant_state.nested) == (quant_type, double_quant)
    # Embeddings, head and norms stay in the model's dtype: no float32 copies of them.
    unquantised = _unquantised_weights(model)
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(
        unquantised
    )
    assert set(unquantised.values()) == {torch.bfloat16}
    assert type(model.get_base_model().lm_head) is torch.nn.Linear  # never quantised
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert model.get_base_model().is_activation_checkpointing


def test_8bit_base_trains_adapters_on_the_cpu(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir, bits=8)
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 2 * len(TARGETS)
    assert all(isinstance(m.base_layer, bnb.nn.Linear8bitLt) for m in adapted)
    assert set(_unquantised_weights(model).values()) == {torch.bfloat16}
    samples = [Sample(np.arange(10 + i, 25 + i, dtype=np.int32), np.ones(15, bool), 0, i) for i in range(2)]
    batch = {**collate_rows([samples], pad_id=0), "packed": True}
    model.train()
    token_losses(model, batch, chunk_size=8).loss.mean().backward()  # through the chunked head loss
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_refuses_a_device_it_does_not_run_on(tiny_model_dir: Path) -> None:
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    with pytest.raises(ImportError, match=rf"not on meta with bitsandbytes {bnb.__version__}"):
        load_model(model_cfg, FinetuneConfig(method="qlora"), device=torch.device("meta"))


def test_train_cli_runs_qlora(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tmp_path / "qlora.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model_dir)},
                "data": {
                    "tasks": {"write_test": {"path": str(EXAMPLES / "write_test")}},
                    "max_seq_len": 128,
                    "cache_dir": str(tmp_path / "cache"),
                    "num_proc": 1,
                    "max_valid_samples": 4,
                },
                "train": {
                    "output_dir": str(tmp_path / "run"),
                    "learning_rate": 1e-2,
                    "max_steps": 3,
                    "global_batch_size": 2,
                    "micro_batch_size": 2,
                    "log_every": 1,
                    "eval_every": 100,
                    "tensorboard": False,
                    "plots": False,
                },
            }
        )
    )
    assert main(["train", str(config), "finetune.method=qlora", "model.dtype=bfloat16"]) == 0
    rows = read_metrics(tmp_path / "run")
    assert len([r for r in rows if "train/loss" in r]) == 3
    valid = [r["valid/loss"] for r in rows if "valid/loss" in r]
    assert valid[-1] < valid[0]  # before training, after 3 steps
    adapter = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    # B starts at zero: nonzero B means the steps moved the adapters.
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


IDS = torch.arange(10, 30)[None]


@pytest.fixture(scope="module")
def qlora_adapter(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[Path, torch.Tensor]:
    """A QLoRA adapter with nonzero B (not a no-op), saved as training saves it, and the logits of
    the 4-bit model it sits on."""
    model = _load(tiny_model_dir).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
        quantised_logits = model(input_ids=IDS).logits.float()
    out = tmp_path_factory.mktemp("qlora-adapter")
    model.save_pretrained(out)
    return out, quantised_logits


def _logits(model_dir: Path, dtype: torch.dtype, adapter: Path | None = None) -> torch.Tensor:
    """Logits of an unquantised model, with `adapter` applied unmerged by peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _base_and_update(base_dir: Path, adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted weight W and its update scale · B A, read from the files, in float32."""
    base = load_file(next(base_dir.glob("*.safetensors")))
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    pairs = {}
    for key, a in adapter.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b = adapter[key.replace("lora_A", "lora_B")]
            pairs[name] = base[name].float(), SCALE * (b.float() @ a.float())
    return pairs


def test_merge_folds_a_qlora_adapter_into_the_unquantised_base(
    qlora_adapter: tuple[Path, torch.Tensor], tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter, quantised_logits = qlora_adapter
    out = merge_adapter(adapter, tmp_path / "merged")  # dtype auto: the base's own, float32 here
    merged = load_file(next(out.glob("*.safetensors")))
    pairs = _base_and_update(tiny_model_dir, adapter)
    assert len(pairs) == 2 * len(TARGETS)
    for name, (weight, update) in pairs.items():
        torch.testing.assert_close(merged[name], weight + update, atol=1e-6, rtol=1e-6)
    reference = _logits(tiny_model_dir, torch.float32, adapter=adapter)
    torch.testing.assert_close(_logits(out, torch.float32), reference, atol=1e-5, rtol=1e-5)
    # Control: the 4-bit model the adapter sits on is far from that.
    assert (quantised_logits - reference).abs().max() > 3e-2


def test_merge_in_bf16_rounds_base_plus_adapter(
    qlora_adapter: tuple[Path, torch.Tensor], tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter, quantised_logits = qlora_adapter
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out), "--dtype", "bfloat16"]) == 0
    merged = load_file(next(out.glob("*.safetensors")))
    for name, (weight, update) in _base_and_update(tiny_model_dir, adapter).items():
        # peft rounds W and the update to bf16, then their sum: each rounding is within 2^-8 relative.
        bound = (weight.abs() + update.abs() + (weight + update).abs()) * 2**-8
        assert merged[name].dtype == torch.bfloat16
        assert ((merged[name].float() - (weight + update)).abs() <= bound).all()
    # Against the unquantised bf16 base with the adapter unmerged, which rounds at other places:
    # logits of about 1 agree to a few bf16 steps, closer than the 4-bit model's.
    reference = _logits(tiny_model_dir, torch.bfloat16, adapter=adapter)
    merged_logits = _logits(out, torch.bfloat16)
    torch.testing.assert_close(merged_logits, reference, atol=3e-2, rtol=0)
    assert (quantised_logits - merged_logits).abs().max() > 3e-2


def test_merge_refuses_a_quantised_base(
    qlora_adapter: tuple[Path, torch.Tensor], tiny_model_dir: Path, tmp_path: Path
) -> None:
    _load(tiny_model_dir).get_base_model().save_pretrained(tmp_path / "base-4bit")
    assert "quantization_config" in json.loads((tmp_path / "base-4bit" / "config.json").read_text())
    with pytest.raises(ValueError, match="quantised checkpoint"):
        merge_adapter(qlora_adapter[0], tmp_path / "out", base=str(tmp_path / "base-4bit"))
