"""Load the model to fine-tune: dtype, attention, gradient checkpointing, adapters or quantisation."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
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
    name: str,
    device: torch.device,
    *,
    packing: str | None = None,
    dtype: torch.dtype | None = None,
    limits: AttentionLimits | None = None,
    max_seq_len: int | None = None,
) -> str:
    """The transformers `attn_implementation` a `model.attention` setting means.

    `varlen` is mftune's `mftune_varlen` backend (`mftune.model.attention`), registered with
    transformers here: packed samples run as separate sequences through a variable-length kernel.
    It runs anywhere; without a CUDA kernel (on the CPU, in float32, on GPUs older than sm80)
    it warns that its pure-torch reference kernel is only a correctness path.

    `auto` is `mftune_varlen` for isolated packing on a CUDA device where torch's or flash-attn's
    varlen kernel runs in `dtype`, and sdpa otherwise: transformers derives a block-causal mask from
    restarting position ids, so isolated packing is exact with sdpa too, only slower. `limits` (see
    `attention_limits`) narrow both: `auto` keeps off `mftune_varlen` for a model it cannot run
    (logit soft-capping, a sliding window shorter than `max_seq_len`), and is eager for one without sdpa attention in transformers
    (Gemma-2), which builds the same block-causal mask. Other names pass through to transformers.

    Args:
        name: A `ModelConfig.attention` value.
        device: Where the model will run.
        packing: The `data.packing` mode, when known.
        dtype: The model's weight dtype, when known.
        limits: What the model's architecture allows; everything when not given.
        max_seq_len: The longest sample, when known.

    Raises:
        ValueError: `sdpa` or `varlen` for a model that cannot run it.
        MissingPackageError: A flash-attention setting without its package.
    """
    limits = limits or AttentionLimits()
    half = dtype in (None, torch.float16, torch.bfloat16)
    if name == "varlen":
        if limits.softcapping:
            raise ValueError(
                "model.attention varlen: this model soft-caps its attention logits, which mftune_varlen "
                "does not implement; set model.attention: auto"
            )
        window = limits.sliding_window
        if window is not None and max_seq_len is not None and max_seq_len > window:
            # Refused now rather than at the first sample longer than the window, hours in.
            raise ValueError(
                f"model.attention varlen: this model attends within a {window}-token sliding window, "
                f"which mftune_varlen does not implement, and data.max_seq_len {max_seq_len} is longer; "
                f"set data.max_seq_len <= {window}, or model.attention: auto"
            )
        if not (half and cuda_varlen_kernel_available(device)):
            warnings.warn(
                f"attention 'varlen' has no CUDA kernel on {device} in {dtype or 'this dtype'} (torch >= 2.10 "
                "or flash-attn, float16 or bfloat16, sm80+): its reference kernel runs one sample at a time, "
                "a correctness path slower than sdpa",
                stacklevel=2,
            )
        return register_varlen_attention()
    if name == "auto":
        if (
            packing == "isolated"
            and half
            and not limits.softcapping
            and (limits.sliding_window is None or max_seq_len is None or max_seq_len <= limits.sliding_window)
            and cuda_varlen_kernel_available(device)
        ):
            return register_varlen_attention()
        return "sdpa" if limits.sdpa else "eager"
    if name == "sdpa" and not limits.sdpa:
        raise ValueError(
            "model.attention sdpa: this model has no sdpa attention in the installed transformers; "
            "set model.attention: auto or eager"
        )
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
    max_seq_len: int | None = None,
) -> torch.nn.Module:
    """Load `model_cfg.name_or_path` ready for training with `finetune_cfg.method`.

    Args:
        model_cfg: The `model` config section (paths already resolved).
        finetune_cfg: The `finetune` config section.
        device: Where the model is trained.
        packing: The `data.packing` mode, which `model.attention: auto` depends on.
        max_seq_len: `data.max_seq_len`, which `auto` compares with a sliding window.

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
        "attn_implementation": resolve_attention(
            model_cfg.attention,
            device,
            packing=packing,
            dtype=dtype,
            limits=attention_limits(_config_of(model_cfg)),
            max_seq_len=max_seq_len,
        ),
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


def _config_of(model_cfg: ModelConfig):
    """The model's `PretrainedConfig`, or None where it cannot be read up front (from_pretrained then says why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code
        )
    except Exception:  # an unloadable path is reported by from_pretrained, with its own message
        return None


@dataclass(frozen=True)
class AttentionLimits:
    """What a model's architecture allows of the attention backends.

    Attributes:
        sdpa: Whether its transformers class runs sdpa attention.
        softcapping: Whether it soft-caps attention logits, which `mftune_varlen` does not implement.
        sliding_window: Its sliding window in tokens, which `mftune_varlen` runs only for samples no
            longer than the window; None without one.
    """

    sdpa: bool = True
    softcapping: bool = False
    sliding_window: int | None = None


def attention_limits(config) -> AttentionLimits:
    """The `AttentionLimits` of a model with `PretrainedConfig` `config` (None: no limits known)."""
    if config is None:
        return AttentionLimits()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)  # None for remote code
    layer_types = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if layer_types:  # Qwen2/3 keep a window in the config that no layer uses
        window = window if "sliding_attention" in layer_types else None
    elif not getattr(config, "use_sliding_window", True):
        window = None
    return AttentionLimits(
        sdpa=bool(getattr(model_class, "_supports_sdpa", True)),
        softcapping=bool(getattr(config, "attn_logit_softcapping", None)),
        sliding_window=window or None,
    )


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
