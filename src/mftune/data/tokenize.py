"""Rendered text -> token ids and a trained-token mask, from the tokenizer's character offsets.

The text is tokenized piece by piece (`Rendered.pieces`: cut at every prompt/answer boundary and wherever
the template cuts), so a token never straddles a prompt and its answer; within a piece, labels follow from
which tokens overlap a trained character span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mftune.data.templates import Rendered


@dataclass(frozen=True)
class Tokenized:
    """One sample's token ids, int32 (n,), and trained mask, bool (n,)."""

    input_ids: np.ndarray
    trained: np.ndarray
    truncated: bool = False

    @property
    def num_targets(self) -> int:
        """Trained tokens that are prediction targets: the first token never is (nothing precedes it)."""
        return int(self.trained[1:].sum())


class SampleDropped(Exception):
    """A sample that cannot be trained; `reason` is a counter name of the data report."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(detail)


def trained_mask(offsets: np.ndarray, spans: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Which tokens overlap a trained character span.

    Args:
        offsets: int (n, 2) character `[start, end)` of each token.
        spans: trained character spans.

    Returns:
        bool (n,).
    """
    mask = np.zeros(len(offsets), dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for span_start, span_end in spans:
        mask |= (starts < span_end) & (ends > span_start)
    return mask


def encode_pieces(tokenizer, text: str, pieces: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids, int32 (n,), and character offsets into `text`, int64 (n, 2), of each piece tokenized alone."""
    if not pieces:
        return np.zeros(0, dtype=np.int32), np.zeros((0, 2), dtype=np.int64)
    batch = tokenizer([text[a:b] for a, b in pieces], add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray([i for row in batch["input_ids"] for i in row], dtype=np.int32)
    offsets = [
        np.asarray(row, dtype=np.int64).reshape(-1, 2) + start
        for row, (start, _) in zip(batch["offset_mapping"], pieces, strict=True)
    ]
    return ids, np.concatenate(offsets)


def tokenize_rendered(tokenizer, rendered: Rendered, max_len: int, overlong: str) -> Tokenized:
    """Tokenize a rendered sample and apply the length policy.

    Args:
        tokenizer: a fast Hugging Face tokenizer (offsets are required).
        rendered: the text and its trained spans.
        max_len: `data.max_seq_len`.
        overlong: `"drop"` or `"truncate"` (keep the first `max_len` tokens).

    Raises:
        SampleDropped: too long under `drop` (reason `overlong`), or no trained target left
            (reason `no_trained_tokens`).
    """
    ids, offsets = encode_pieces(tokenizer, rendered.text, rendered.pieces())
    trained = trained_mask(offsets, rendered.spans)
    truncated = False
    if len(ids) > max_len:
        if overlong == "drop":
            raise SampleDropped("overlong", f"{len(ids)} tokens > max_seq_len {max_len}")
        ids, trained, truncated = ids[:max_len], trained[:max_len], True
    sample = Tokenized(ids, trained, truncated)
    if sample.num_targets == 0:
        detail = "no trained token left after truncation" if truncated else "the template trains no token"
        raise SampleDropped("no_trained_tokens", detail)
    return sample
