"""Packing (isolated, sequential and contiguous) and collation into model tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mftune.data.collate import Sample, block_diagonal_mask, collate_rows
from mftune.data.packing import fill_ratio, pack_contiguous, pack_isolated, pack_sequential


def _rows(rows: list[np.ndarray]) -> list[list[int]]:
    return [row.tolist() for row in rows]


def _sample(ids: list[int], trained: list[bool], task_id: int, sample_id: int, **kw) -> Sample:
    return Sample(np.array(ids, dtype=np.int32), np.array(trained, dtype=bool), task_id, sample_id, **kw)


# --- isolated packing ---------------------------------------------------------------


def test_pack_isolated_by_hand():
    # Longest first: 5 opens a row (room 1), 4 opens one (room 2), 3 opens one (room 3),
    # 2 best-fits the room-2 row, 1 the room-1 row.
    assert _rows(pack_isolated(np.array([5, 4, 3, 2, 1]), 6, window=5)) == [[0, 4], [1, 3], [2]]


def test_pack_isolated_window_limits_reordering():
    lengths = np.array([1, 2, 3, 4, 5])
    # One window: decreasing order pairs 5+1 and 4+2.
    assert _rows(pack_isolated(lengths, 6, window=5)) == [[4, 0], [3, 1], [2]]
    # Window of one sample is plain best fit in arrival order: 1+2+3 fill the first row.
    assert _rows(pack_isolated(lengths, 6, window=1)) == [[0, 1, 2], [3], [4]]


def test_pack_isolated_fills_rows_across_windows():
    # Window 1 leaves two rows with room 2; window 2's samples fill them, oldest row first.
    assert _rows(pack_isolated(np.array([4, 4, 2, 2]), 6, window=2)) == [[0, 2], [1, 3]]


def test_pack_isolated_realistic_lengths():
    rng = np.random.default_rng(0)
    max_len = 4096
    lengths = np.clip(rng.lognormal(np.log(350), 1.0, size=20_000).astype(np.int64), 1, max_len)
    rows = pack_isolated(lengths, max_len, window=1000)
    flat = np.concatenate(rows)
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(lengths)))
    row_lengths = np.array([lengths[row].sum() for row in rows])
    assert row_lengths.max() <= max_len
    assert fill_ratio(row_lengths, max_len) >= 0.98
    # Deterministic.
    assert _rows(rows) == _rows(pack_isolated(lengths, max_len, window=1000))


def test_pack_isolated_rejects_bad_lengths():
    with pytest.raises(ValueError, match="more than max_len"):
        pack_isolated(np.array([3, 9, 2]), 8, window=4)
    with pytest.raises(ValueError, match="at least one token"):
        pack_isolated(np.array([3, 0]), 8, window=4)
    with pytest.raises(ValueError):
        pack_isolated(np.array([3]), 8, window=0)
    assert pack_isolated(np.array([], dtype=np.int64), 8, window=4) == []


# --- sequential packing (MFTCoder's pack) -----------------------------------------------


def test_pack_sequential_by_hand():
    # 3 opens a row; 3 + 4 > 6 opens the next; 4 + 2 = 6 fits; 6 + 1 > 6 opens the next; 1 + 4 fits.
    assert _rows(pack_sequential(np.array([3, 4, 2, 1, 4]), 6)) == [[0], [1, 2], [3, 4]]
    with pytest.raises(ValueError, match="more than max_len"):
        pack_sequential(np.array([7]), 6)


def _mftcoder_pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """MFTCoder's `pack` as its encoder runs it: a buffer of whole samples, emitted when the next does not fit;
    samples over the capacity dropped; the last buffer never emitted."""
    rows, buffer, used = [], [], 0
    for index, n in enumerate(lengths):
        if n > capacity:
            continue
        if used + n > capacity:
            rows.append(buffer)
            buffer, used = [index], n
        else:
            buffer, used = [*buffer, index], used + n
    return rows


def test_pack_sequential_builds_mftcoders_rows_and_keeps_the_last():
    lengths = np.random.default_rng(3).integers(1, 200, size=500)
    rows = _rows(pack_sequential(lengths, 512))
    assert rows[:-1] == _mftcoder_pack(lengths.tolist(), 512)  # MFTCoder drops the last, partial row
    assert [i for row in rows for i in row] == list(range(len(lengths)))  # whole samples, in order


# --- contiguous packing (MFTCoder's concat) -----------------------------------------------


def test_pack_contiguous_by_hand():
    # Stream: s0 [0,3) s1 [3,8) s2 [8,10) s3 [10,16); windows of 4 tokens starting every 3.
    assert pack_contiguous(np.array([3, 5, 2, 6]), 4) == [
        [(0, 0, 3), (1, 0, 1)],  # [0, 4)
        [(1, 0, 4)],  # [3, 7)
        [(1, 3, 5), (2, 0, 2)],  # [6, 10)
        [(2, 1, 2), (3, 0, 3)],  # [9, 13)
        [(3, 2, 6)],  # [12, 16)
    ]


def test_pack_contiguous_predicts_every_token_once():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, size=2000)
    max_len = 128
    starts = np.cumsum(lengths) - lengths
    rows = pack_contiguous(lengths, max_len)
    stream = [[int(starts[k]) + t for k, a, b in row for t in range(a, b)] for row in rows]
    assert all(len(row) == max_len for row in stream[:-1]) and 1 < len(stream[-1]) <= max_len
    for k, row in enumerate(stream):  # each window is one run of the stream, starting where the last ended
        assert row == list(range(k * (max_len - 1), k * (max_len - 1) + len(row)))
    targets = [t for row in stream for t in row[1:]]  # a window's first token is no target in it
    assert targets == list(range(1, int(lengths.sum())))


def test_fill_ratio():
    assert fill_ratio([4, 4, 2], 4) == pytest.approx(10 / 12)
    assert fill_ratio([], 4) == 0.0


# --- collate ------------------------------------------------------------------------


def _two_rows() -> list[list[Sample]]:
    a = _sample([11, 12, 13], [False, True, True], task_id=0, sample_id=100)
    b = _sample([21, 22], [True, True], task_id=1, sample_id=101)
    c = _sample([31, 32, 33, 34], [False, False, True, True], task_id=2, sample_id=102)
    return [[a, b], [c]]


def test_collate_isolated_by_hand():
    batch = collate_rows(_two_rows(), pad_id=0)
    expected = {
        "input_ids": [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]],
        # First token of each sample is never a target, even when trained (b's 21).
        "labels": [[-100, 12, 13, -100, 22], [-100, -100, 33, 34, -100]],
        # Restart per sample; padding continues counting.
        "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]],
        "task_ids": [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]],
        "sample_ids": [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]],
        "attention_mask": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
    }
    for name, value in expected.items():
        assert batch[name].dtype == torch.long, name
        assert batch[name].tolist() == value, name
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9]
    assert batch["max_seqlen"] == 4


def test_collate_contiguous_positions_and_pieces():
    rows = _two_rows()
    rows[1][0].is_start = False  # a continuation piece keeps its first label
    batch = collate_rows(rows, pad_id=0, isolated=False)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, -100, 33, 34, -100]]
    rows[1][0].trained[:] = True
    assert collate_rows(rows, 0, isolated=False)["labels"][1].tolist() == [31, 32, 33, 34, -100]
    assert "cu_seqlens" not in batch and "max_seqlen" not in batch


def test_collate_pad_to():
    batch = collate_rows(_two_rows(), pad_id=7, pad_to=8)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 7, 7, 7], [31, 32, 33, 34, 7, 7, 7, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert batch["attention_mask"].sum().item() == 9
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9]
    with pytest.raises(ValueError):
        collate_rows(_two_rows(), pad_id=0, pad_to=4)


def test_block_diagonal_mask_by_hand():
    sample_ids = torch.tensor([[0, 0, 1, -1]])
    mask = block_diagonal_mask(sample_ids, torch.tensor([[1, 1, 1, 0]]), torch.float32)
    assert mask.shape == (1, 1, 4, 4)
    allowed = [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],  # sample 1 does not see sample 0
        [0, 0, 0, 1],  # padding sees only itself, so softmax stays finite
    ]
    assert (mask[0, 0] == 0).int().tolist() == allowed
    assert mask[0, 0, 0, 1].item() == torch.finfo(torch.float32).min
    assert torch.isfinite(torch.softmax(mask, dim=-1)).all()


def test_packed_attention_equals_unpacked():
    torch.manual_seed(0)
    batch = collate_rows(_two_rows(), pad_id=0)
    mask = block_diagonal_mask(batch["sample_ids"], batch["attention_mask"], torch.float32)
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)  # (B, heads, T, head_dim)
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(packed).all()
    # Each sample alone with plain causal attention gives the same outputs.
    for b, start, end in [(0, 0, 3), (0, 3, 5), (1, 0, 4)]:
        s = slice(start, end)
        alone = F.scaled_dot_product_attention(
            q[b : b + 1, :, s], k[b : b + 1, :, s], v[b : b + 1, :, s], is_causal=True
        )
        torch.testing.assert_close(packed[b : b + 1, :, s], alone)
