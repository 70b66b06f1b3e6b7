"""Load the model to fine-tune: dtype, attention, gradient checkpointing, adapters or quantisation."""

from __future__ import annotations

import importlib.util
import warnings
from typing import TYPE_CHECKING

import torch

from mftune.config.errors import MissingPackageError, unloadable
from mftune.model.adapters import apply_lora
from mftune.model.attention import cuda_varlen_kernel_available, register_varlen_attention

if TYPE_CHECKING:
    from mftune.config.schema import FinetuneConfig, ModelConfig, QloraConfig

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# `auto` turns gradient checkpointing on above this many parameters (DESIGN.md §5).
_CHECKPOINTING_THRESHOLD = 1_000_000_000
_NON_REENTRANT = {"use_reentrant": False}
# The first bitsandbytes that runs every `finetune.qlora` setting on the CPU (`_check_bitsandbytes_runs_on`).
_CPU_BITSANDBYTES = "0.47"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weight dtype a `model.dtype` setting means on `device`.

    Args:
        name: `auto`, `float32`, `bfloat16` or `float16`.
        device: Where the model will run.

    Returns:
        For `auto`: bfloat16 on CUDA devices that support it, float16 on older CUDA devices (trained
        with loss scaling), float32 elsewhere. An explicit name is honoured everywhere.

    Raises:
        ValueError: Unknown name.
    """
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        warnings.warn(f"{name} on CPU is slow and imprecise; float32 is the usual choice", stacklevel=2)
    return dtype


def resolve_attention(
    name: str, device: torch.device, *, packing: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """The transformers `attn_implementation` a `model.attention` setting means.

    `varlen` is mftune's `mftune_varlen` backend (`mftune.model.attention`), registered with
    transformers here: packed samples run as separate sequences through a variable-length kernel.
    It runs anywhere; without a CUDA kernel (on the CPU, in float32, on GPUs older than sm80)
    it warns that its pure-torch reference kernel is only a correctness path.

    `auto` is `mftune_varlen` for isolated packing on a CUDA device where torch's or flash-attn's
    varlen kernel runs in `dtype`, and sdpa otherwise: transformers derives a block-causal mask from
    restarting position ids, so isolated packing is exact with sdpa too, only slower. Other names
    pass through to transformers.

    Args:
        name: A `ModelConfig.attention` value.
        device: Where the model will run.
        packing: The `data.packing` mode, when known.
        dtype: The model's weight dtype, when known.
    """
    half = dtype in (None, torch.float16, torch.bfloat16)
    if name == "varlen":
        if not (half and cuda_varlen_kernel_available(device)):
            warnings.warn(
                f"attention 'varlen' has no CUDA kernel on {device} in {dtype or 'this dtype'} (torch >= 2.10 "
                "or flash-attn, float16 or bfloat16, sm80+): its reference kernel runs one sample at a time, "
                "a correctness path slower than sdpa",
                stacklevel=2,
            )
        return register_varlen_attention()
    if name == "auto":
        if packing == "isolated" and half and cuda_varlen_kernel_available(device):
            return register_varlen_attention()
        return "sdpa"
    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise MissingPackageError(
            f"model.attention {name} needs {package}, which is not installed: install it, or set "
            "model.attention: auto (varlen flash kernels on GPUs that have them, sdpa elsewhere)"
        )
    return name


def load_model(
    model_cfg: ModelConfig,
    finetune_cfg: FinetuneConfig,
    *,
    device: torch.device,
    packing: str | None = None,
) -> torch.nn.Module:
    """Load `model_cfg.name_or_path` ready for training with `finetune_cfg.method`.

    Args:
        model_cfg: The `model` config section (paths already resolved).
        finetune_cfg: The `finetune` config section.
        device: Where the model is trained.
        packing: The `data.packing` mode, which `model.attention: auto` depends on.

    Returns:
        The causal LM on `device` with `config.use_cache` off: a plain model for `full`, a `PeftModel`
        for `lora`, `dora` and `qlora`.

    Raises:
        ImportError: `qlora` without bitsandbytes, or on a device the installed bitsandbytes does not
            run on (see `_quantized_loading`).
    """
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoModelForCausalLM

    method = finetune_cfg.method
    dtype = resolve_dtype(model_cfg.dtype, device)
    kwargs = {
        "dtype": dtype,
        "attn_implementation": resolve_attention(model_cfg.attention, device, packing=packing, dtype=dtype),
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    if method == "qlora":
        kwargs.update(_quantized_loading(finetune_cfg.qlora, device, dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, **kwargs)
    except (OSError, HFValidationError) as err:
        raise unloadable("model.name_or_path", model_cfg.name_or_path, err) from err
    if method != "qlora":  # a quantised model is placed by its device_map
        model.to(device)
    model.config.use_cache = False  # the cache only serves generation and conflicts with checkpointing
    checkpointing = _wants_checkpointing(model_cfg.gradient_checkpointing, model, method)
    # QLoRA is prepared like LoRA, not with peft's `prepare_model_for_kbit_training`: that casts
    # every unquantised weight (embeddings, head, norms) to float32, GiBs more for a large
    # vocabulary, whereas here they stay in the model's dtype, as under LoRA on a bf16 base.
    # Freezing the base is left to peft, which freezes all but the adapters when it wraps the model.
    if checkpointing:
        _enable_checkpointing(model)
        if method != "full":
            # With a frozen embedding nothing before the first checkpointed layer needs grad;
            # this keeps checkpointing correct even if a model falls back to reentrant mode.
            model.enable_input_require_grads()
    if method == "full":
        return model
    return apply_lora(model, finetune_cfg.lora, use_dora=method == "dora")


def _wants_checkpointing(setting: str, model: torch.nn.Module, method: str) -> bool:
    if setting != "auto":
        return setting == "on"
    # Quantised weights are counted in packed storage elements, so the threshold cannot apply;
    # QLoRA is chosen to save memory, and checkpointing is peft's default for it.
    return method == "qlora" or model.num_parameters() > _CHECKPOINTING_THRESHOLD


def _enable_checkpointing(model) -> None:
    # transformers 5.2x renamed gradient checkpointing to activation checkpointing; older 5.x lack the new name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=_NON_REENTRANT)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_NON_REENTRANT)


def _quantized_loading(qlora_cfg: QloraConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """`from_pretrained` arguments that load the base quantised by bitsandbytes.

    Args:
        qlora_cfg: The `finetune.qlora` config section.
        device: Where the model is trained: a CUDA device, or the CPU with bitsandbytes >= 0.47
            (slow; for tests and demos).
        dtype: The model's weight dtype; 4-bit layers compute in it when it is float16 or bfloat16,
            else in bfloat16.

    Returns:
        `quantization_config` and a `device_map` that places the whole model on `device`.

    Raises:
        ImportError: bitsandbytes is missing, or the installed version does not run on `device`.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingPackageError("finetune.method qlora needs bitsandbytes: pip install 'mftune[gpu]'")
    _check_bitsandbytes_runs_on(device)
    from transformers import BitsAndBytesConfig

    if qlora_cfg.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        compute = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=qlora_cfg.quant_type,
            bnb_4bit_use_double_quant=qlora_cfg.double_quant,
            bnb_4bit_compute_dtype=compute,
            # Packed into elements of the dtype the other weights of a half-precision model have,
            # so FSDP and ZeRO-3 can shard the 4-bit weights along with them.
            bnb_4bit_quant_storage=compute,
        )
    if device.type == "cpu":
        return {"quantization_config": quantization, "device_map": {"": "cpu"}}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"quantization_config": quantization, "device_map": {"": index}}


def _check_bitsandbytes_runs_on(device: torch.device) -> None:
    import bitsandbytes
    from packaging.version import Version

    version = bitsandbytes.__version__
    # Before 0.46 bitsandbytes ran on CUDA only and has no device registry. 0.46 lists the CPU
    # but cannot dequantise 4-bit weights packed in bf16 or fp4 there; 0.47 runs all settings.
    backends = getattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    if device.type == "cpu" and "cpu" in backends and Version(version) >= Version(_CPU_BITSANDBYTES):
        return
    if device.type == "cuda" and "cuda" in backends:
        return
    raise MissingPackageError(
        f"finetune.method qlora runs on CUDA, or on the CPU with bitsandbytes >= {_CPU_BITSANDBYTES}: "
        f"not on {device} with bitsandbytes {version}"
    )
