"""Packing: group samples into rows of at most `max_len` tokens.

- `pack_isolated` bin-packs whole samples; attention is later kept inside each sample
  (position ids restart, varlen attention or a block-diagonal mask), so a packed row
  trains exactly like the same samples unpacked, minus the padding.
- `pack_sequential` is MFTCoder's `pack`: whole samples in the order given, a new row
  whenever the next sample would not fit; samples in a row attend to each other.
- `pack_contiguous` is MFTCoder's `concat`, for continued pre-training: samples are
  concatenated and the stream is cut into windows of `max_len` tokens that overlap by one,
  so that every token but the first is a prediction target exactly once; samples attend to
  each other.
"""

from __future__ import annotations

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


def pack_sequential(lengths: np.ndarray, max_len: int) -> list[np.ndarray]:
    """Whole samples in order; a row is closed when the next sample would not fit in it.

    Args:
        lengths: Token count of every sample, shape `(n,)`, integers in `[1, max_len]`.
        max_len: Maximum tokens per row.

    Returns:
        One int64 array of consecutive sample indices per row; every row starts at a sample start.

    Raises:
        ValueError: If a sample is longer than `max_len` or has no tokens.
    """
    lengths = _check_lengths(lengths, max_len)
    if len(lengths) and lengths.max() > max_len:
        index = int(lengths.argmax())
        raise ValueError(f"sample {index} has {int(lengths[index])} tokens, more than max_len={max_len}")
    rows, start, used = [], 0, 0
    for index, length in enumerate(lengths.tolist()):
        if used + length > max_len:
            rows.append(np.arange(start, index, dtype=np.int64))
            start, used = index, 0
        used += length
    if start < len(lengths):
        rows.append(np.arange(start, len(lengths), dtype=np.int64))
    return rows


def pack_contiguous(lengths: np.ndarray, max_len: int) -> list[list[tuple[int, int, int]]]:
    """Concatenate samples in order and cut the stream into windows of `max_len` tokens, each starting on
    the last token of the one before.

    This is continued pre-training packing, as MFTCoder's `concat` (windows of `seq_length + 1`
    tokens, `seq_length` apart): a sample may be split across rows, and samples in one row attend
    to each other. The first token of a window is no target in it, but was one, as the last
    token, of the window before, so no token goes unpredicted. Every row holds `max_len` tokens
    except possibly the last, which MFTCoder drops and mftune keeps.

    Args:
        lengths: Token count of every sample, shape `(n,)`, integers >= 1.
        max_len: Tokens per row, >= 2.

    Returns:
        Per row, its pieces in order as `(sample_index, start, end)`: tokens
        `[start, end)` of sample `sample_index`.
    """
    lengths = _check_lengths(lengths, max_len)
    if max_len < 2:
        raise ValueError(f"contiguous windows need max_len >= 2, got {max_len}")
    if len(lengths) == 0:
        return []
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1])
    rows = []
    # A window is worth a row while it holds a target: a token after its first.
    for window_start in range(0, max(total - 1, 1), max_len - 1):
        window_end = min(window_start + max_len, total)
        first = int(np.searchsorted(ends, window_start, side="right"))
        last = int(np.searchsorted(starts, window_end, side="left"))  # samples [first, last) overlap
        rows.append(
            [
                (
                    k,
                    max(window_start, int(starts[k])) - int(starts[k]),
                    min(window_end, int(ends[k])) - int(starts[k]),
                )
                for k in range(first, last)
            ]
        )
    return rows


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
