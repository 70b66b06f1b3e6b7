"""A conversation rendered to text: the text, its trained character spans, and where it is cut before
tokenizing."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

Span = tuple[int, int]


@dataclass(frozen=True)
class Rendered:
    """Rendered text, its trained character spans `[start, end)` (sorted, disjoint), and where the text is
    cut before tokenizing.

    The text is tokenized piece by piece, cut at every span boundary and at every position in `cuts`, so
    that no token straddles a prompt and its answer (DESIGN.md §2).
    """

    text: str
    spans: tuple[Span, ...]
    cuts: tuple[int, ...] = ()

    def pieces(self) -> list[Span]:
        """The `[start, end)` character ranges tokenized one by one, in order, covering the text."""
        bounds = {0, len(self.text), *self.cuts, *(edge for span in self.spans for edge in span)}
        ordered = sorted(b for b in bounds if 0 <= b <= len(self.text))
        return [(a, b) for a, b in itertools.pairwise(ordered) if b > a]
