"""Per-token cross entropy of the output projection, without full-vocabulary logits.

A model's own forward materialises (B, T, V) logits and the loss upcasts them to float32;
with a 150k vocabulary that costs more memory than a small model. Here the logits exist only
for `chunk_size` targets at a time, in the forward and in the backward (each chunk runs under
activation checkpointing, so its logits are recomputed instead of kept). Gradients flow to
the hidden states, to the weight and bias when they require them, and the output is per
token so that mftune's coefficients (`mftune.loss.weighting`) can weigh each one.

`lm_head_loss` calls the output head module on each chunk rather than reading its weight: under
DeepSpeed ZeRO-3 or FSDP2 the weight is gathered only inside the head's forward (and again when the
chunk is recomputed in backward), and a PEFT `modules_to_save` wrapper routes the call to its
trained copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    if hidden.ndim != 2 or weight.ndim != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"expected hidden (N, H) and weight (V, H); got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    return _chunked_cross_entropy(
        lambda x: F.linear(x, weight, bias),
        (weight, bias),
        hidden,
        targets,
        chunk_size=chunk_size,
        logit_scale=logit_scale,
        softcap=softcap,
    )


def lm_head_loss(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 2048,
    *,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_cross_entropy` through a model's output head, with the model's logit scaling.

    The head module itself projects each chunk, so whatever wraps it does its work. Under ZeRO-3,
    or FSDP2 with the head sharded as a unit of its own, each call gathers the head's weight from
    all ranks: then this is a collective, which every rank must run as often as the others.

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
        ValueError: On mismatched shapes or a chunk_size below 1.
        NotImplementedError: If the head carries adapters (LoRA on the head would be ignored),
            is quantised, or the model transforms its logits in a way not replayed here.
    """
    if hasattr(head, "base_layer"):  # a PEFT tuner layer: `.weight` is the base weight alone
        raise NotImplementedError(
            "adapters on the output head are not supported by the chunked loss; "
            "leave lm_head out of finetune.lora.target_modules (modules_to_save works)"
        )
    # Under ZeRO-3 `weight` may be an empty placeholder here; its dtype is still the real one.
    weight = head.weight
    if not weight.is_floating_point():
        raise NotImplementedError(f"the output head {type(head).__name__} is quantised ({weight.dtype})")
    # ZeRO-3 keeps the full shape of a partitioned weight in `ds_shape`; FSDP2's DTensor has it as `shape`.
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    if len(shape) == 2 and shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"expected hidden (N, H={shape[1]}) for the head's weight {shape}; got {tuple(hidden.shape)}"
        )
    logit_scale, softcap = logit_transform(config) if config is not None else (1.0, None)
    return _chunked_cross_entropy(
        head,
        head.parameters(),
        hidden,
        targets,
        chunk_size=chunk_size,
        logit_scale=logit_scale,
        softcap=softcap,
        num_chunks=_num_head_calls(head, hidden, chunk_size),
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


def _chunked_cross_entropy(
    project: Callable[[torch.Tensor], torch.Tensor],
    params: Iterable[torch.Tensor | None],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int,
    logit_scale: float,
    softcap: float | None,
    num_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk loop of both entry points; `project` maps hidden (n, H) to logits (n, V).

    `num_chunks`, if given, is at least the chunks the targets need: the missing ones are empty.
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (N, H), targets (N,); got {tuple(hidden.shape)}, {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    # Without targets this is one empty chunk: the loss is still tied to the head and the hidden
    # states, so backward runs and DDP sees a (zero) gradient for every parameter it expects one for.
    chunks = list(zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True))
    chunks += [(hidden[:0], targets[:0])] * ((num_chunks or 0) - len(chunks))

    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p is not None and p.requires_grad for p in params)
    )
    losses, corrects = [], []
    for hidden_chunk, target_chunk in chunks:
        args = (project, hidden_chunk, target_chunk, logit_scale, softcap)
        # Non-reentrant checkpointing saves only the chunk's inputs and recomputes its logits in
        # backward, calling `project` again (a sharded head gathers its weight again there); it
        # handles a frozen weight or bias without special cases.
        loss, correct = (
            checkpoint(_chunk_loss, *args, use_reentrant=False) if needs_grad else _chunk_loss(*args)
        )
        losses.append(loss)
        corrects.append(correct)
    return torch.cat(losses), torch.cat(corrects)


def _num_head_calls(head: torch.nn.Module, hidden: torch.Tensor, chunk_size: int) -> int | None:
    """The chunks to run through `head` when every call of it is a collective, else None.

    Under ZeRO-3, or FSDP2 with the head sharded on its own, each call gathers the head's weight
    from all ranks, in forward and again in backward: every rank must make as many calls, whatever
    its number of targets, or the ranks' collectives no longer match (a hang or a crash).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    zero3 = any(hasattr(p, "ds_id") for p in head.parameters())
    if not zero3 and not any(isinstance(m, FSDPModule) for m in head.modules()):
        return None
    count = torch.tensor(max(1, -(-hidden.shape[0] // max(chunk_size, 1))), device=hidden.device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count)


def _chunk_loss(
    project: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Upcast before scaling and log-softmax: bf16 logits lose the small differences between
    # large values that the loss depends on.
    logits = project(hidden).float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, targets, reduction="none")
    correct = logits.detach().argmax(dim=-1) == targets
    return loss, correct
