"""Scores: exact match after normalisation, the unbiased pass@k estimator, means with standard errors."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

_WHITESPACE = re.compile(r"\s+")


def normalise(text: str, *, case_sensitive: bool = True, collapse_whitespace: bool = False) -> str:
    """`text` stripped of surrounding whitespace; optionally case-folded and with whitespace runs as one space."""
    text = text.strip()
    if collapse_whitespace:
        text = _WHITESPACE.sub(" ", text)
    return text if case_sensitive else text.casefold()


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed (Chen et al., 2021):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement include a passing one.

    Computed as a product, which stays exact in floating point where the binomials would overflow.

    Raises:
        ValueError: Not 0 <= c <= n, or not 1 <= k <= n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean of per-problem scores and its standard error (sample standard deviation / sqrt(count));
    None for the error of a single value."""
    if not values:
        raise ValueError("no values")
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, None
    return mean, float(array.std(ddof=1) / math.sqrt(len(array)))
