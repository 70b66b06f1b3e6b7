"""Collate packed rows of samples into the tensors the model, attention and loss need."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # label of a token that is not a prediction target (Hugging Face convention)


@dataclass(eq=False)
class Sample:
    """One tokenized sample, or a piece of one under contiguous packing.

    Attributes:
        input_ids: Token ids, int32, shape `(n,)`, n >= 1.
        trained: Whether each token's label is trained, bool, shape `(n,)`.
        task_id: Index of the sample's task.
        sample_id: Global id of the sample, for bookkeeping.
        is_start: Whether `input_ids[0]` is the sample's real first token. False for the
            second and later pieces of a sample split across rows by contiguous packing.
    """

    input_ids: np.ndarray
    trained: np.ndarray
    task_id: int
    sample_id: int
    is_start: bool = True

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 1 or self.input_ids.shape != self.trained.shape:
            raise ValueError(
                f"sample {self.sample_id}: input_ids {self.input_ids.shape} and trained "
                f"{self.trained.shape} must be 1-D and of the same length"
            )
        if len(self.input_ids) == 0:
            raise ValueError(f"sample {self.sample_id} has no tokens")


def collate_rows(
    rows: list[list[Sample]], pad_id: int, *, isolated: bool = True, pad_to: int | None = None
) -> dict[str, torch.Tensor | int]:
    """Lay rows of samples out as a padded batch.

    Each row is its samples concatenated (packing) or a single sample (no packing). With
    B = `len(rows)`, T = the longest row (or `pad_to`) and S = the number of samples in
    the batch, the result holds:

    - `input_ids` (B, T) long: padded with `pad_id`.
    - `labels` (B, T) long: the token id where trained, else -100, aligned with `input_ids`
      (the loss shifts by one). The first token of every sample is -100 even when trained:
      it is never a prediction target, and in a packed row it would otherwise be
      "predicted" from the previous sample. Pieces with `is_start=False` keep theirs.
    - `position_ids` (B, T) long: restart at 0 for every sample when `isolated`, run on
      across the row otherwise. Padding positions continue counting from the last token;
      that is harmless (padding has no labels and no real token attends to it) and keeps
      a zero from marking a spurious sequence start.
    - `task_ids` (B, T) long: the sample's task id, -1 on padding.
    - `sample_ids` (B, T) long: the sample's index within the batch, 0..S-1 in row-major
      order, -1 on padding; the loss counts tokens per sample with it. Under contiguous
      packing each piece counts as a sample.
    - `attention_mask` (B, T) long: 1 on real tokens, 0 on padding.
    - `cu_seqlens` (S+1,) int32 and `max_seqlen` (python int), only when `isolated`:
      cumulative sample lengths over the batch flattened to its real tokens, as varlen
      flash attention expects.
    - `varlen_cu_seqlens` (S+1,) int32 and `varlen_max_seqlen` (python int), only when
      `isolated`: the same segments over the padded batch flattened to B*T tokens, each
      starting where `position_ids` is 0, so a row's padding extends its last sample
      (harmless: padding comes after it and is never a target). The `mftune_varlen`
      attention backend takes these, computed here so no kernel waits on the GPU for them.

    Args:
        rows: B non-empty lists of samples.
        pad_id: Token id written into padding.
        isolated: Whether samples in a row are kept apart (isolated packing or no packing).
        pad_to: Optional fixed T, e.g. `max_seq_len` for static shapes.

    Returns:
        The tensors above, keyed by name.

    Raises:
        ValueError: If a row is empty or longer than `pad_to`.
    """
    row_lens = [sum(len(s.input_ids) for s in row) for row in rows]
    if not rows or min(row_lens) == 0:
        raise ValueError("cannot collate an empty batch or an empty row")
    width = max(row_lens) if pad_to is None else pad_to
    if max(row_lens) > width:
        raise ValueError(f"a row has {max(row_lens)} tokens, more than pad_to={pad_to}")

    shape = (len(rows), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    task_ids = np.full(shape, -1, dtype=np.int64)
    sample_ids = np.full(shape, -1, dtype=np.int64)
    seqlens: list[int] = []
    for b, row in enumerate(rows):
        offset = 0
        for sample in row:
            n = len(sample.input_ids)
            span = slice(offset, offset + n)
            ids = sample.input_ids.astype(np.int64)
            input_ids[b, span] = ids
            labels[b, span] = np.where(sample.trained, ids, IGNORE_INDEX)
            if sample.is_start:
                labels[b, offset] = IGNORE_INDEX
            position_ids[b, span] = np.arange(n)
            task_ids[b, span] = sample.task_id
            sample_ids[b, span] = len(seqlens)
            seqlens.append(n)
            offset += n
        if isolated:
            position_ids[b, offset:] = position_ids[b, offset - 1] + 1 + np.arange(width - offset)
        else:
            position_ids[b] = np.arange(width)

    batch: dict[str, torch.Tensor | int] = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "task_ids": torch.from_numpy(task_ids),
        "sample_ids": torch.from_numpy(sample_ids),
        "attention_mask": torch.from_numpy((sample_ids >= 0).astype(np.int64)),
    }
    if isolated:
        cu_seqlens = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
        batch["cu_seqlens"] = torch.from_numpy(cu_seqlens)
        batch["max_seqlen"] = max(seqlens)
        bounds = np.append(np.flatnonzero(position_ids.reshape(-1) == 0), position_ids.size)
        batch["varlen_cu_seqlens"] = torch.from_numpy(bounds.astype(np.int32))
        batch["varlen_max_seqlen"] = int(np.diff(bounds).max())
    return batch


def block_diagonal_mask(
    sample_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive attention mask that keeps attention causal and inside each sample.

    This is how isolated packing is enforced where varlen attention is not available
    (CPU, sdpa, eager). A padding query attends only to itself, so no row of the mask is
    entirely masked (an all-masked row makes softmax return NaN).

    Args:
        sample_ids: Per-token sample index within the batch, -1 on padding, shape (B, T).
        attention_mask: 1 on real tokens, 0 on padding, shape (B, T).
        dtype: Dtype of the mask, that of the attention scores.

    Returns:
        Shape (B, 1, T, T), indexed `[batch, head, query, key]`: 0 where the query may attend
        the key (same sample, key not after query), `torch.finfo(dtype).min` elsewhere.
    """
    width = sample_ids.shape[1]
    device = sample_ids.device
    same_sample = sample_ids[:, :, None] == sample_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    real_key = attention_mask.bool()[:, None, :]
    diagonal = torch.eye(width, dtype=torch.bool, device=device)
    allowed = (same_sample & causal & real_key) | diagonal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
