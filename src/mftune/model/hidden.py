"""Run the decoder without its output head, so the loss can project hidden states chunk by chunk.

The model's usual forward materialises logits over the whole vocabulary at every position
(B × T × V floats); the loss instead takes the final hidden states and the output head separately.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mftune.model.attention import uses_varlen_attention, varlen_kwargs


def output_head(model: nn.Module) -> nn.Module:
    """The output projection (`lm_head`) of a causal LM, also through a `PeftModel` and through
    distributed wrappers (DDP, DeepSpeed, compiled modules)."""
    from accelerate.utils import extract_model_from_parallel

    head = extract_model_from_parallel(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    return head


def model_config(model: nn.Module):
    """The causal LM's `PretrainedConfig`, also through distributed wrappers: DDP has no `config`
    attribute and DeepSpeed's engine has its own, so reading `model.config` on them would silently
    drop logit scaling and the router loss."""
    from accelerate.utils import extract_model_from_parallel

    return getattr(extract_model_from_parallel(model), "config", None)


def hidden_states(model: nn.Module, batch: Mapping[str, torch.Tensor], *, packed: bool) -> torch.Tensor:
    """Final hidden states of the decoder (after its last norm), with no logits computed.

    The call goes through the outermost module's forward, so whatever wraps the model does its
    work as usual (peft's LoRA layers, DDP's gradient synchronisation, DeepSpeed's and FSDP's
    parameter gathering), and asks for logits at no position (`logits_to_keep`). The hidden
    states of every layer come back: free in training, where autograd (or checkpointing) keeps
    each layer's input anyway; under `no_grad` they hold L × B × T × H values until this returns.

    Packed rows are passed with `attention_mask=None`: transformers then finds where the
    `position_ids` restart and keeps each sample's attention inside itself (block-causal masking,
    `masking_utils.find_packed_sequence_indices`); under contiguous packing the position ids never
    restart and attention is plainly causal. Padded rows (`packing: none`) pass their 2-D
    `attention_mask`. The cache is off: transformers skips packed detection when there is one.

    A model running the `mftune_varlen` attention (`mftune.model.attention`) instead gets the
    batch's `varlen_cu_seqlens` and `varlen_max_seqlen`, when the collator made them, as
    transformers' flash-attention keyword arguments, and no mask: its kernel runs every sample
    as its own sequence, padded rows included (their padding only follows the sample).

    Args:
        model: A causal LM, a `PeftModel` around one, or a distributed wrapper around either.
        batch: `input_ids`, `position_ids` and `attention_mask`, each (B, T), and for isolated rows
            `varlen_cu_seqlens` and `varlen_max_seqlen`, as from `collate_rows`.
        packed: Whether rows hold packed samples (isolated or contiguous) rather than one padded sample.

    Returns:
        Shape (B, T, H), in the model's dtype.
    """
    return forward_hidden(model, batch, packed=packed)[0]


def forward_hidden(
    model: nn.Module, batch: Mapping[str, torch.Tensor], *, packed: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`hidden_states`, plus a mixture-of-experts model's router load-balancing loss.

    Returns:
        Hidden states (B, T, H), and the router loss already scaled by the model's
        `router_aux_loss_coef` (a scalar), or None for a dense model.
    """
    input_ids = batch["input_ids"]
    config = model_config(model)
    is_moe = hasattr(config, "router_aux_loss_coef")
    extra: dict[str, object] = {"output_router_logits": True} if is_moe else {}
    attention_mask = None if packed else batch["attention_mask"]
    if "varlen_cu_seqlens" in batch and uses_varlen_attention(config):
        extra |= varlen_kwargs(batch["varlen_cu_seqlens"], int(batch["varlen_max_seqlen"]))
        attention_mask = None
    out = model(
        input_ids=input_ids,
        position_ids=batch["position_ids"],
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
        **extra,
    )
    aux = getattr(out, "aux_loss", None) if is_moe else None
    if aux is not None:
        aux = aux * config.router_aux_loss_coef
    return out.hidden_states[-1], aux
