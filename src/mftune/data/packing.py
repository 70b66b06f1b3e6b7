"""Packing: group samples into rows of at most `max_len` tokens.

- `pack_isolated` bin-packs whole samples; attention is later kept inside each sample
  (position ids restart, varlen attention or a block-diagonal mask), so a packed row
  trains exactly like the same samples unpacked, minus the padding.
- `pack_contiguous` is MFTCoder's `pack` for continued pre-training: samples are
  concatenated and cut at every `max_len` tokens, and they attend to each other.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, insort
from collections import deque

import numpy as np


def _check_lengths(lengths: np.ndarray, max_len: int) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be a 1-D integer array, got shape {lengths.shape} {lengths.dtype}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if len(lengths) and lengths.min() < 1:
        raise ValueError(f"every sample needs at least one token; sample {int(lengths.argmin())} has none")
    return lengths.astype(np.int64, copy=False)


def pack_isolated(lengths: np.ndarray, max_len: int, window: int) -> list[np.ndarray]:
    """Best-fit-decreasing bin packing of whole samples, window by window.

    Samples are taken in the given order in consecutive windows of `window` samples. Within
    a window they are placed longest first (stable on ties), each into the open row with the
    least remaining room that still fits it (on ties, the row that has had that room the
    longest), or into a new row. Rows stay open across windows so the next window can fill
    the tail of the previous one. A larger window packs tighter
    but moves samples further from the (shuffled) order they came in.

    Runs in O(n log max_len): open rows are bucketed by remaining capacity and the smallest
    capacity that fits is found by bisection over the distinct capacities (at most `max_len`).

    Args:
        lengths: Token count of every sample, shape `(n,)`, integers in `[1, max_len]`.
        max_len: Maximum tokens per row.
        window: Number of consecutive samples sorted together, >= 1.

    Returns:
        One int64 array of sample indices (into `lengths`) per row, rows in creation order,
        samples within a row in placement order. Every index appears exactly once.

    Raises:
        ValueError: If a sample is longer than `max_len` (the tokenizer step drops or
            truncates those first), has no tokens, or `window < 1`.
    """
    lengths = _check_lengths(lengths, max_len)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(lengths) == 0:
        return []
    if lengths.max() > max_len:
        index = int(lengths.argmax())
        raise ValueError(f"sample {index} has {int(lengths[index])} tokens, more than max_len={max_len}")

    min_len = int(lengths.min())
    rows: list[list[int]] = []
    open_rows: list[deque[int]] = [deque() for _ in range(max_len + 1)]  # capacity -> open row ids
    capacities: list[int] = []  # sorted capacities that have open rows
    for start in range(0, len(lengths), window):
        order = start + np.argsort(-lengths[start : start + window], kind="stable")
        for index, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
            pos = bisect_left(capacities, length)
            if pos < len(capacities):
                capacity = capacities[pos]
                queue = open_rows[capacity]
                row = queue.popleft()
                if not queue:
                    capacities.pop(pos)
            else:
                capacity, row = max_len, len(rows)
                rows.append([])
            rows[row].append(index)
            remaining = capacity - length
            # A row that no sample can fit into any more is closed for good.
            if remaining >= min_len:
                if not open_rows[remaining]:
                    insort(capacities, remaining)
                open_rows[remaining].append(row)
    return [np.asarray(row, dtype=np.int64) for row in rows]


def pack_contiguous(lengths: np.ndarray, max_len: int) -> list[list[tuple[int, int, int]]]:
    """Concatenate samples in order and cut the stream into rows of `max_len` tokens.

    This is continued pre-training packing: a sample may be split across two or more rows,
    and samples in one row attend to each other (no isolation). Every row holds exactly
    `max_len` tokens except possibly the last.

    Args:
        lengths: Token count of every sample, shape `(n,)`, integers >= 1.
        max_len: Tokens per row.

    Returns:
        Per row, its pieces in order as `(sample_index, start, end)`: tokens
        `[start, end)` of sample `sample_index`.
    """
    lengths = _check_lengths(lengths, max_len)
    if len(lengths) == 0:
        return []
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1])
    # A piece starts wherever a sample or a row starts, and runs to the next such point.
    cuts = np.union1d(starts, np.arange(0, total, max_len))
    piece_end = np.append(cuts[1:], total)
    sample = np.searchsorted(ends, cuts, side="right")
    local_start = cuts - starts[sample]
    local_end = piece_end - starts[sample]
    pieces = list(zip(sample.tolist(), local_start.tolist(), local_end.tolist(), strict=True))
    row_starts = [*np.searchsorted(cuts, np.arange(0, total, max_len)).tolist(), len(cuts)]
    return [pieces[a:b] for a, b in itertools.pairwise(row_starts)]


def fill_ratio(row_lengths: np.ndarray | list[int], max_len: int) -> float:
    """Fraction of the row capacity that holds real tokens.

    Args:
        row_lengths: Tokens in every row, shape `(num_rows,)`.
        max_len: Capacity of a row.

    Returns:
        `sum(row_lengths) / (num_rows * max_len)`, or 0.0 when there are no rows.
    """
    row_lengths = np.asarray(row_lengths, dtype=np.int64)
    if row_lengths.size == 0:
        return 0.0
    return float(row_lengths.sum()) / (row_lengths.size * max_len)
