"""Per-token cross entropy of the output projection, without full-vocabulary logits.

A model's own forward materialises (B, T, V) logits and the loss upcasts them to float32;
with a 150k vocabulary that costs more memory than a small model. Here the logits exist only
for `chunk_size` targets at a time, in the forward and in the backward (each chunk runs under
activation checkpointing, so its logits are recomputed instead of kept). Gradients flow to
the hidden states, to the weight and bias when they require them, and the output is per
token so that mftune's coefficients (`mftune.loss.weighting`) can weigh each one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Config attributes that change a causal LM's logits after the head and that we do not replay.
_UNSUPPORTED_LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def token_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 2048,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of `softcap(logit_scale · (hidden @ weight.T + bias))` against `targets`.

    Args:
        hidden: Hidden states of the N positions that predict a target, shape (N, H).
        weight: Output projection, shape (V, H); may be frozen (e.g. under LoRA).
        targets: Target token ids, long, shape (N,).
        bias: Optional output bias, shape (V,).
        chunk_size: Targets whose float32 logits (chunk_size, V) exist at one time.
        logit_scale: Factor on the logits (Cohere's `logit_scale`, Granite's 1/`logits_scaling`).
        softcap: If set, logits become `softcap · tanh(logits / softcap)` (Gemma 2 and later).

    Returns:
        `(loss, correct)`: the float32 loss of each target, shape (N,), and whether the argmax
        logit is the target, bool, shape (N,), without gradient.

    Raises:
        ValueError: On mismatched shapes or a chunk_size below 1.
    """
    num_targets = hidden.shape[0]
    if (
        hidden.ndim != 2
        or weight.ndim != 2
        or weight.shape[1] != hidden.shape[1]
        or targets.shape != (num_targets,)
    ):
        raise ValueError(
            f"expected hidden (N, H), weight (V, H), targets (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if num_targets == 0:
        return _empty_loss(hidden, weight, bias), torch.zeros(0, dtype=torch.bool, device=hidden.device)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    losses, corrects = [], []
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        args = (hidden_chunk, weight, bias, target_chunk, logit_scale, softcap)
        # Non-reentrant checkpointing saves only the chunk's inputs and recomputes its logits in
        # backward; it handles a frozen weight or bias without special cases.
        loss, correct = (
            checkpoint(_chunk_loss, *args, use_reentrant=False) if needs_grad else _chunk_loss(*args)
        )
        losses.append(loss)
        corrects.append(correct)
    return torch.cat(losses), torch.cat(corrects)


def lm_head_loss(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 2048,
    *,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_cross_entropy` through a model's output head, with the model's logit scaling.

    Args:
        head: The output projection, an `nn.Linear`-like module with `weight` (V, H) and
            `bias` (or a PEFT `modules_to_save` wrapper of one).
        hidden: Shape (N, H), the final hidden states (after the last norm) at the target positions.
        targets: Long, shape (N,).
        chunk_size: See `token_cross_entropy`.
        config: The model's `PretrainedConfig` (`model.config`). Pass it: it tells whether
            the model scales or soft-caps its logits, which `logit_transform` replays.

    Returns:
        `(loss, correct)`, each shape (N,), as `token_cross_entropy`.

    Raises:
        NotImplementedError: If the head carries adapters (LoRA on the head would be ignored),
            is quantised, or the model transforms its logits in a way not replayed here.
    """
    if hasattr(head, "base_layer"):  # a PEFT tuner layer: `.weight` is the base weight alone
        raise NotImplementedError(
            "adapters on the output head are not supported by the chunked loss; "
            "leave lm_head out of finetune.lora.target_modules (modules_to_save works)"
        )
    weight = head.weight
    if not weight.is_floating_point():
        raise NotImplementedError(f"the output head {type(head).__name__} is quantised ({weight.dtype})")
    logit_scale, softcap = logit_transform(config) if config is not None else (1.0, None)
    return token_cross_entropy(
        hidden,
        weight,
        targets,
        bias=getattr(head, "bias", None),
        chunk_size=chunk_size,
        logit_scale=logit_scale,
        softcap=softcap,
    )


def logit_transform(config: Any) -> tuple[float, float | None]:
    """How a causal LM rescales the logits of its head, read from its config.

    Replayed: Cohere's `logit_scale` (multiplied), Granite's and MiniCPM3's `logits_scaling`
    (divided), and `final_logit_softcapping` (Gemma 2 and later). Any other model that sets one
    of these attributes, or Falcon-H1's `lm_head_multiplier`, is refused rather than trained
    on the wrong logits.

    Args:
        config: A `PretrainedConfig` (for a multimodal model, its text config is read).

    Returns:
        `(logit_scale, softcap)` for `token_cross_entropy`.

    Raises:
        NotImplementedError: For a logit scaling not replayed here, naming the model type.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(text, "model_type", "") or "")
    if model_type.startswith("cohere"):
        logit_scale = float(text.logit_scale)
    elif model_type.startswith("granite") or model_type == "minicpm3":
        logit_scale = 1.0 / float(text.logits_scaling)
    else:
        logit_scale = 1.0
        for name in _UNSUPPORTED_LOGIT_SCALES:
            value = getattr(text, name, None)
            if value is not None and value != 1:
                raise NotImplementedError(
                    f"model type {model_type!r} scales its logits by config.{name}={value}, "
                    "which mftune's chunked cross entropy does not replay"
                )
    softcap = getattr(text, "final_logit_softcapping", None)
    return logit_scale, (float(softcap) if softcap else None)


def _chunk_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Upcast before scaling and log-softmax: bf16 logits lose the small differences between
    # large values that the loss depends on.
    logits = F.linear(hidden, weight, bias).float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, targets, reduction="none")
    correct = logits.detach().argmax(dim=-1) == targets
    return loss, correct


def _empty_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # A micro-batch without targets still returns a loss tied to the head and the hidden states,
    # so backward runs and DDP sees a (zero) gradient for every parameter it expects one for.
    anchor = hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0)
    return torch.zeros(0, dtype=torch.float32, device=hidden.device) + anchor.float() * 0
