"""LoRA and DoRA adapters: which modules they wrap, and the wrapping itself (peft)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

    from mftune.config.schema import LoraConfig


def lora_target_modules(model: nn.Module) -> list[str]:
    """Name suffixes of every linear layer except the output head, in model order.

    Derived from the model rather than a per-architecture table, so it covers llama (`q_proj` ...
    `down_proj`), GPT-NeoX (`query_key_value`, `dense`, `dense_h_to_4h`, `dense_4h_to_h`), Phi-3
    (`qkv_proj`, `gate_up_proj` ...) and GPT-2 style `Conv1D` layers alike. peft matches a suffix
    against the end of each module's dotted name. A linear layer whose suffix is also the head's
    name is listed by its full name instead, so the head is never wrapped; mixture-of-experts routers
    (`router_modules`) are never listed: adapting them would change which experts see a token.

    Args:
        model: A transformers causal LM (not yet wrapped by peft).

    Returns:
        Suffixes such as `["q_proj", "k_proj", ...]`, each once.
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head}
    routers = set(router_modules(model))
    targets: dict[str, None] = {}
    for name, module in model.named_modules():
        if module is head or name in routers or not isinstance(module, nn.Linear | Conv1D):
            continue
        suffix = name.rsplit(".", 1)[-1]
        targets[name if suffix in head_names else suffix] = None
    return list(targets)


def router_modules(model: nn.Module) -> list[str]:
    """Full names of a mixture-of-experts model's routing layers: linear layers that score the experts
    (as many outputs as the model has experts) or gate a shared expert (one output), in MoE blocks.

    Args:
        model: A transformers causal LM.

    Returns:
        Names such as `model.layers.0.mlp.gate`; empty for a dense model.
    """
    config = getattr(model, "config", None)
    experts = next(
        (
            getattr(config, key)
            for key in ("num_local_experts", "num_experts", "n_routed_experts")
            if getattr(config, key, None)
        ),
        None,
    )
    if not experts:
        return []
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.out_features in (experts, 1)
        and name.rsplit(".", 1)[-1].endswith("gate")
    ]


def resolve_target_modules(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The module names a `finetune.lora.target_modules` setting means for `model`.

    Args:
        model: A transformers causal LM (not yet wrapped by peft).
        targets: `all-linear`, or module names (a suffix or a full dotted name each).

    Returns:
        `lora_target_modules(model)` for `all-linear`, else `targets` unchanged.

    Raises:
        ValueError: A name matches no module of the model; the message lists the linear layers.
    """
    if targets == "all-linear":
        return lora_target_modules(model)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ValueError(
            f"finetune.lora.target_modules: {', '.join(map(repr, missing))} match no module of "
            f"{type(model).__name__}; its linear layers are {', '.join(lora_target_modules(model))}"
        )
    return list(targets)


def apply_lora(model: nn.Module, lora_cfg: LoraConfig, *, use_dora: bool) -> PeftModel:
    """Wrap `model` with LoRA (or DoRA) adapters; only the adapters (and `modules_to_save`) train.

    Args:
        model: A transformers causal LM.
        lora_cfg: The `finetune.lora` config section.
        use_dora: Decompose updates into magnitude and direction (DoRA).

    Returns:
        The `PeftModel`; the LoRA layers are injected into `model` in place.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=resolve_target_modules(model, lora_cfg.target_modules),
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        bias=lora_cfg.bias,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    # peft upcasts half-precision adapters to float32 by default, which also casts each adapted
    # layer's input to float32; `model` keeps them in the base weights' dtype instead.
    return get_peft_model(model, config, autocast_adapter_dtype=lora_cfg.adapter_dtype == "float32")
