"""Variable-length attention (`mftune_varlen`): packed samples run as separate sequences, with no mask.

Isolated packing keeps attention inside each sample. sdpa does it with a block-causal (B, 1, T, T) mask
that transformers derives from restarting position ids; a variable-length kernel instead takes the
whole batch flattened to one sequence of B·T tokens plus `cu_seqlens`, the offsets where segments
start, and never computes the masked-out blocks. Kernels, in order of preference:

- `torch`: torch's own `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10), on CUDA;
- `flash_attn`: `flash_attn.flash_attn_varlen_func`, on CUDA when flash-attn is installed;
- `reference`: one causal `scaled_dot_product_attention` per segment, for the CPU, float32, or a GPU
  neither kernel supports. It is exact but slow: a correctness path.

Both CUDA kernels take fewer key/value heads than query heads (GQA) as they are, so K/V are never
repeated for them. `_kernel_name` picks the kernel for a query; tests replace it to drive a CUDA
kernel's call path on the CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

VARLEN_ATTENTION = "mftune_varlen"
# Both CUDA kernels are FlashAttention-2 builds: half precision on Ampere (sm80) and newer.
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_MIN_CAPABILITY = (8, 0)
_CAUSAL_WINDOW = (-1, 0)  # torch's varlen_attn reads exactly this tuple as causal


def register_varlen_attention() -> str:
    """Make `mftune_varlen` an `attn_implementation` transformers accepts; safe to call again.

    The attention entry is `varlen_attention_forward`. The mask entry is transformers' own for
    flash attention: it returns no mask, or only the 2-D padding mask, so no (B, 1, T, T) mask is built.

    Returns:
        The name to pass as `attn_implementation`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    # `register` sets a key of a class-wide dict: calling it again rewrites the same entries.
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, flash_attention_mask)
    return VARLEN_ATTENTION


def cuda_varlen_kernel_available(device: torch.device) -> bool:
    """Whether `device` is a CUDA device that torch's or flash-attn's varlen kernel can run on."""
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and _cuda_kernel(_device_index(device)) is not None
    )


def uses_varlen_attention(config) -> bool:
    """Whether a model whose `PretrainedConfig` is `config` (see `hidden.model_config`) runs `mftune_varlen`."""
    return getattr(config, "_attn_implementation", None) == VARLEN_ATTENTION


def varlen_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict[str, torch.Tensor | int]:
    """The keyword arguments (transformers' `FlashAttentionKwargs`) that carry segments to the kernel.

    Passed to the model's forward, they reach every attention layer unchanged.

    Args:
        cu_seqlens: Segment offsets in the batch flattened to B·T tokens, int32, shape (S+1,).
        max_seqlen: The longest segment, a python int (so no kernel reads it back from the GPU).
    """
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
    }


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal self-attention of a batch flattened to one sequence, as a transformers attention function.

    Segments come, in this order, from:

    1. `cu_seq_lens_q` and `max_length_q` in `kwargs`: what mftune's training passes (see
       `varlen_kwargs`), computed once per batch on the CPU;
    2. a 2-D `attention_mask` (padded rows): each row's real tokens form one sequence, and padding
       positions get zeros, as flash attention does;
    3. `position_ids` in `kwargs`: a segment starts at every row start and wherever a position does
       not follow the previous one by 1, which is how transformers finds packed rows for sdpa;
    4. nothing: each row is one causal sequence.

    Cases 2 and 3 read values back from the device in every layer; they serve models called outside
    mftune's training step. A KV cache (generation) is not supported: load such a model with sdpa.
    Nor is a sliding window, except one no segment is longer than (it then changes nothing).

    Args:
        module: The attention layer.
        query: Shape (B, Hq, T, D).
        key: Shape (B, Hkv, T, D), Hq a multiple of Hkv.
        value: Shape (B, Hkv, T, D).
        attention_mask: None, or (B, T) with True (or 1) on real tokens.
        scaling: Softmax scale; None means 1/sqrt(D).
        dropout: Attention dropout probability.
        **kwargs: What transformers passes on to attention functions.

    Returns:
        The attention output (B, T, Hq, D), and None for the attention weights.

    Raises:
        ValueError: A KV cache, a 4-D mask, or a feature this backend lacks (a sliding window
            shorter than a segment, softcapping, attention sinks, non-causal attention).
    """
    _check_supported(module, query, key, attention_mask, kwargs)
    dtype = query.dtype
    if query.is_cuda and dtype == torch.float32 and (target := _compute_dtype(module)) in _CUDA_DTYPES:
        # float32 activations of a half-precision model (peft keeps norms in float32 for k-bit
        # training) run the kernel in the model's dtype, as transformers' flash attention does.
        query, key, value = (x.to(target) for x in (query, key, value))
    batch, num_heads, width, head_dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(batch * width, x.shape[1], head_dim) for x in (query, key, value))
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    keep = None
    if cu_seqlens is None and attention_mask is not None:
        keep, cu_seqlens, max_seqlen = _unpadded_segments(attention_mask)
        q, k, v = (x.index_select(0, keep) for x in (q, k, v))
    elif cu_seqlens is None:
        cu_seqlens, max_seqlen = _segments_from_positions(kwargs.get("position_ids"), batch, width, q.device)
    elif max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max())
    window = kwargs.get("sliding_window")
    if window is not None and max_seqlen > window:  # a window no segment outgrows changes nothing
        raise ValueError(
            f"mftune_varlen has no sliding-window attention, and a {max_seqlen}-token sample outgrows the "
            f"model's {window}-token window; use attention 'sdpa' for this model"
        )
    out = varlen_attention(q, k, v, cu_seqlens, int(max_seqlen), scale=scaling, dropout=dropout)
    if keep is not None:
        out = out.new_zeros(batch * width, num_heads, head_dim).index_copy(0, keep, out)
    return out.view(batch, width, num_heads, head_dim).to(dtype), None


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention inside each segment of a flattened sequence, with the best kernel for `query`.

    Args:
        query: Shape (N, Hq, D).
        key: Shape (N, Hkv, D), Hq a multiple of Hkv.
        value: Shape (N, Hkv, D).
        cu_seqlens: Segment offsets, shape (S+1,), from 0 to N, on `query`'s device.
        max_seqlen: The longest segment.
        scale: Softmax scale; None means 1/sqrt(D).
        dropout: Attention dropout probability.

    Returns:
        Shape (N, Hq, D).

    Raises:
        ValueError: Non-zero dropout with torch's kernel, which has none; segments not covering N tokens.
    """
    cu_seqlens = cu_seqlens.to(torch.int32)
    kernel = _kernel_name(query)
    if kernel == "torch":
        if dropout:
            raise ValueError(
                f"attention dropout {dropout} is not supported by torch's varlen kernel; set the "
                "model's attention_dropout to 0 or install flash-attn"
            )
        varlen_attn = _torch_varlen_attn()
        gqa = {"enable_gqa": True} if _takes_enable_gqa(varlen_attn) else {}  # torch < 2.13 takes GQA as is
        return varlen_attn(
            query,
            key,
            value,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            scale=scale,
            window_size=_CAUSAL_WINDOW,
            **gqa,
        )
    if kernel == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            query,
            key,
            value,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            dropout_p=dropout,
            softmax_scale=scale,
            causal=True,
        )
    if query.is_cuda:
        warnings.warn(
            f"varlen attention in {query.dtype} on {query.device}: no CUDA kernel fits (they need float16 or "
            "bfloat16 on sm80+), running the slow reference kernel",
            stacklevel=2,
        )
    return _reference_attention(query, key, value, cu_seqlens, scale=scale, dropout=dropout)


def _compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype an attention layer computes in: autocast's, a quantised model's, or its weights'."""
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    config = getattr(module, "config", None)
    if getattr(config, "_is_quantized", False):
        return config.dtype  # packed 4-bit storage says nothing of the compute dtype
    weight = next((m.weight for m in module.modules() if isinstance(m, nn.Linear)), None)
    return None if weight is None else weight.dtype


def _kernel_name(query: torch.Tensor) -> str:
    """`torch`, `flash_attn` or `reference`: the kernel `varlen_attention` runs for `query`."""
    if query.device.type != "cuda" or query.dtype not in _CUDA_DTYPES:
        return "reference"
    return _cuda_kernel(_device_index(query.device)) or "reference"


@functools.cache
def _cuda_kernel(device_index: int) -> str | None:
    # Cached per device: the answer cannot change within a process.
    if torch.cuda.get_device_capability(device_index) < _MIN_CAPABILITY:
        return None
    if _torch_varlen_attn() is not None and torch.backends.cuda.is_flash_attention_available():
        return "torch"
    if _flash_attn_installed():
        return "flash_attn"
    return None


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _torch_varlen_attn() -> Callable | None:
    """torch's varlen kernel, `torch.nn.attention.varlen.varlen_attn`, or None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _takes_enable_gqa(kernel: Callable) -> bool:
    return "enable_gqa" in inspect.signature(kernel).parameters


def _reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None,
    dropout: float,
) -> torch.Tensor:
    """`varlen_attention` with one causal sdpa call per segment: exact on any device, slow."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[0]:
        raise ValueError(
            f"segments span tokens {bounds[0]}..{bounds[-1]}, not the {query.shape[0]} of the batch"
        )
    pieces = []
    for start, end in itertools.pairwise(bounds):
        if end > start:
            q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))  # (H, n, D)
            pieces.append(_causal_sdpa(q, k, v, scale=scale, dropout=dropout).transpose(0, 1))
    return torch.cat(pieces)


def _causal_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None, dropout: float
) -> torch.Tensor:
    if _sdpa_takes_enable_gqa():
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=True
        )
    groups = query.shape[-3] // key.shape[-3]
    key, value = (x.repeat_interleave(groups, dim=-3) for x in (key, value))
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scale)


@functools.cache
def _sdpa_takes_enable_gqa() -> bool:
    from transformers.utils.import_utils import is_torch_greater_or_equal

    return is_torch_greater_or_equal("2.5")  # sdpa's enable_gqa appeared in torch 2.5


def _unpadded_segments(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each row's real tokens as one segment: their flat indices, the segment offsets, the longest."""
    real = attention_mask.bool()
    keep = real.flatten().nonzero().squeeze(1)
    lengths = real.sum(dim=1, dtype=torch.int32)
    return keep, F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), int(lengths.max())


def _segments_from_positions(
    position_ids: torch.Tensor | None, batch: int, width: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Segment offsets (int32) and the longest segment, from position ids or else one per row."""
    if position_ids is None:
        return torch.arange(0, (batch + 1) * width, width, dtype=torch.int32, device=device), width
    if position_ids.dim() != 2:
        raise ValueError(f"mftune_varlen needs position ids of shape (B, T), not {tuple(position_ids.shape)}")
    positions = position_ids.expand(batch, width)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    offsets = starts.flatten().nonzero().squeeze(1)
    cu_seqlens = F.pad(offsets.to(torch.int32), (0, 1), value=batch * width)
    return cu_seqlens, int(cu_seqlens.diff().max())


def _check_supported(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: Mapping,
) -> None:
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"mftune_varlen attention runs without a KV cache (keys {key.shape[2]} != queries "
            f"{query.shape[2]}); load the model with attn_implementation='sdpa' to generate"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"mftune_varlen takes no {attention_mask.dim()}-D attention mask, only a 2-D padding mask"
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads")
    is_causal = kwargs.get("is_causal")
    unsupported = {
        "attention logit softcapping": kwargs.get("softcap") is not None,
        "attention sinks": kwargs.get("s_aux") is not None,
        "non-causal attention": not (
            is_causal if is_causal is not None else getattr(module, "is_causal", True)
        ),
    }
    for feature, requested in unsupported.items():
        if requested:
            raise ValueError(f"mftune_varlen attention has no {feature}; use attention 'sdpa' for this model")
