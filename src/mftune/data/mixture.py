"""Task mixture: train/valid splits, task sampling, exact epochs and rank sharding.

Everything here is a pure function of its arguments. Seeds are derived from task names
with `stable_seed`, so adding a task never reshuffles the others, and the order of any
epoch can be recomputed from `(sizes, counts, epoch, seed)` alone, which makes exact
resume trivial.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

SamplingStrategy = Literal["proportional", "uniform", "temperature"]


def stable_seed(*parts: str | int) -> int:
    """A 63-bit seed derived from sha256 of `parts`.

    Unlike Python's `hash`, this is identical across processes and runs. Each part is
    encoded with its type and length, so `("a", 1)` and `("a1",)` or `(1,)` and `("1",)`
    never collide.

    Args:
        parts: Strings and integers, e.g. `(seed, task_name, "split")`.

    Returns:
        An integer in `[0, 2**63)`, usable by `np.random.default_rng` and `torch.manual_seed`.
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, int | str):
            raise TypeError(f"stable_seed parts must be str or int, got {type(part).__name__}")
        tag, data = (b"s", part.encode()) if isinstance(part, str) else (b"i", str(part).encode())
        digest.update(tag + len(data).to_bytes(8, "little") + data)
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def split_train_valid(
    num_samples: int, valid_ratio: float, seed: int, task: str, max_valid: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`split_samples` without a test split: `(train, valid)`."""
    train, valid, _ = split_samples(num_samples, valid_ratio, seed, task, max_valid)
    return train, valid


def split_samples(
    num_samples: int,
    valid_ratio: float,
    seed: int,
    task: str,
    max_valid: int | None = None,
    test_ratio: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministically split one task's samples into train, valid and test indices.

    The number of valid samples is `round(num_samples * valid_ratio)`, at least 1 when
    `valid_ratio > 0` and there are two or more samples, at most `num_samples - 1` (training
    never ends up empty), and at most `max_valid`. The test split (`round(num_samples *
    test_ratio)`, also leaving a training sample) is drawn from the same permutation after it,
    so adding one leaves the valid split as it was.

    Args:
        num_samples: Number of samples of the task.
        valid_ratio: Fraction held out for validation, in `[0, 1)`.
        seed: The run's data seed.
        task: The task name; the permutation is seeded by `stable_seed(seed, task, "split")`.
        max_valid: Optional cap on the number of valid samples.
        test_ratio: Fraction held out for testing (never trained nor validated), in `[0, 1)`.

    Returns:
        `(train, valid, test)`: sorted, disjoint int64 index arrays that together cover
        `range(num_samples)`.

    Raises:
        ValueError: On a negative size, a ratio outside `[0, 1)` or a negative `max_valid`.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    for name, ratio in (("valid_ratio", valid_ratio), ("test_ratio", test_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {ratio}")
    if max_valid is not None and max_valid < 0:
        raise ValueError(f"max_valid must be >= 0, got {max_valid}")
    num_valid = math.floor(num_samples * valid_ratio + 0.5)  # round half up, not to even
    if valid_ratio > 0 and num_samples >= 2:
        num_valid = max(num_valid, 1)
    num_valid = min(num_valid, max(num_samples - 1, 0))
    if max_valid is not None:
        num_valid = min(num_valid, max_valid)
    num_test = min(math.floor(num_samples * test_ratio + 0.5), max(num_samples - 1 - num_valid, 0))
    perm = np.random.default_rng(stable_seed(seed, task, "split")).permutation(num_samples)
    valid = np.sort(perm[:num_valid]).astype(np.int64)
    test = np.sort(perm[num_valid : num_valid + num_test]).astype(np.int64)
    train = np.sort(perm[num_valid + num_test :]).astype(np.int64)
    return train, valid, test


def sampling_probabilities(
    sizes: Mapping[str, int],
    strategy: SamplingStrategy,
    temperature: float = 2.0,
    explicit: Mapping[str, float | None] | None = None,
) -> dict[str, float]:
    """The probability of drawing each task in the mixture.

    - `proportional`: p_k ∝ n_k (the natural sizes).
    - `uniform`: p_k ∝ 1 for every non-empty task.
    - `temperature`: p_k ∝ n_k^(1/T); T=1 is proportional, T→∞ uniform.
    - explicit weights: if any task has one, every task must, and p_k ∝ weight_k
      (`strategy` is then ignored).

    A task with no samples always gets probability 0.

    Args:
        sizes: Task name -> number of training samples, in task order.
        strategy: One of `proportional`, `uniform`, `temperature`.
        temperature: T for the `temperature` strategy, > 0.
        explicit: Optional task name -> sampling weight (None means "not given").

    Returns:
        Task name -> probability, in the order of `sizes`, summing to 1.

    Raises:
        ValueError: If only some tasks have explicit weights, a weight is negative or
            names an unknown task, or every task ends up with weight 0.
    """
    names = list(sizes)
    if any(sizes[name] < 0 for name in names):
        raise ValueError(f"task sizes must be >= 0, got {dict(sizes)}")
    given = {name: w for name, w in (explicit or {}).items() if w is not None}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"sampling weights given for unknown tasks: {unknown}")
    if given:
        missing = [name for name in names if name not in given]
        if missing:
            raise ValueError(
                f"sampling_weight is set for some tasks but not for {missing}; set it for every task or none"
            )
        if any(not math.isfinite(w) or w < 0 for w in given.values()):
            raise ValueError(f"sampling weights must be finite and >= 0, got {given}")
        raw = {name: float(given[name]) for name in names}
    elif strategy == "proportional":
        raw = {name: float(sizes[name]) for name in names}
    elif strategy == "uniform":
        raw = dict.fromkeys(names, 1.0)
    elif strategy == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        raw = {name: float(sizes[name]) ** (1.0 / temperature) for name in names}
    else:
        raise ValueError(
            f"unknown sampling strategy {strategy!r}; choose proportional, uniform or temperature"
        )
    raw = {name: (w if sizes[name] > 0 else 0.0) for name, w in raw.items()}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"every task has zero samples or zero sampling weight: sizes={dict(sizes)}")
    return {name: w / total for name, w in raw.items()}


def samples_per_epoch(sizes: Mapping[str, int], probs: Mapping[str, float]) -> dict[str, int]:
    """How many draws each task gets in one epoch of the mixture.

    An epoch has E = Σ n_k draws. Task k gets round(p_k·E) by largest-remainder rounding
    (ties go to the earlier task), so the counts sum to exactly E.

    Args:
        sizes: Task name -> number of training samples.
        probs: Task name -> probability, as from `sampling_probabilities`.

    Returns:
        Task name -> number of draws per epoch, in the order of `sizes`.
    """
    names = list(sizes)
    total = sum(sizes.values())
    exact = np.array([probs.get(name, 0.0) * total for name in names], dtype=np.float64)
    counts = np.floor(exact).astype(np.int64)
    shortfall = total - int(counts.sum())
    remainder = np.where(exact > 0, exact - counts, -1.0)  # a task with p=0 never gets a draw
    # Stable sort on the negated remainder: largest first, earlier task on ties.
    order = np.argsort(-remainder, kind="stable")
    counts[order[: max(shortfall, 0)]] += 1
    return {name: int(c) for name, c in zip(names, counts, strict=True)}


def _task_stream(num: int, start: int, stop: int, seed: int, task: str) -> np.ndarray:
    """Positions `[start, stop)` of a task's infinite stream of permutations.

    Returns:
        int64 sample indices, shape `(stop - start,)`.
    """
    pieces = []
    for j in range(start // num, (stop - 1) // num + 1):
        perm = np.random.default_rng(stable_seed(seed, task, "pass", j)).permutation(num)
        lo, hi = max(start - j * num, 0), min(stop - j * num, num)
        pieces.append(perm[lo:hi])
    return np.concatenate(pieces)


def _task_draws(num: int, count: int, epoch: int, seed: int, task: str) -> np.ndarray:
    """The samples one task contributes to an epoch, before the mixture shuffle.

    Returns:
        int64 sample indices, shape `(count,)`.
    """
    full, rest = divmod(count, num)
    parts = []
    if full:
        # All full passes of the epoch from one generator, each row shuffled on its own (vectorised).
        rng = np.random.default_rng(stable_seed(seed, task, "full", epoch))
        parts.append(rng.permuted(np.tile(np.arange(num, dtype=np.int64), (full, 1)), axis=1).ravel())
    if rest:
        parts.append(_task_stream(num, epoch * rest, (epoch + 1) * rest, seed, task))
    return np.concatenate(parts).astype(np.int64, copy=False)


def epoch_order(sizes: Mapping[str, int], counts: Mapping[str, int], epoch: int, seed: int) -> np.ndarray:
    """The shuffled draws of one mixture epoch.

    Task k with n_k samples and c_k = q·n_k + r draws per epoch contributes, in epoch e:

    - q full passes over its samples (each a fresh permutation), and
    - positions `[e·r, (e+1)·r)` of its stream: the concatenation of permutations of
      `range(n_k)`, permutation j seeded by `stable_seed(seed, task, "pass", j)`.

    So within one epoch every sample appears q or q+1 times, and the extra draws continue
    one permutation from epoch to epoch: a down-sampled task (q = 0) sees every sample once
    before any repeats, and after epochs 0..e every sample has appeared floor or ceil of
    (e+1)·c_k/n_k times. The draws of all tasks are then shuffled with
    `stable_seed(seed, "epoch", e)`. Seeds depend on the task's name, not its position, so
    adding a task leaves the draws of the others unchanged.

    Args:
        sizes: Task name -> number of training samples; a task's index is its position here.
        counts: Task name -> draws per epoch (missing tasks get 0), as from `samples_per_epoch`.
        epoch: The epoch number, >= 0.
        seed: The run's data seed.

    Returns:
        int64 array of shape `(E, 2)`, E = Σ c_k, of `(task_index, sample_index)` rows, where
        `sample_index` indexes the task's training samples.

    Raises:
        ValueError: On a negative epoch or count, a count for an unknown or empty task.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    unknown = sorted(set(counts) - set(sizes))
    if unknown:
        raise ValueError(f"counts given for unknown tasks: {unknown}")
    task_parts, sample_parts = [], []
    for task_index, (task, num) in enumerate(sizes.items()):
        count = int(counts.get(task, 0))
        if count < 0 or (count > 0 and num <= 0):
            raise ValueError(f"task {task!r}: cannot draw {count} samples from {num}")
        if count == 0:
            continue
        sample_parts.append(_task_draws(num, count, epoch, seed, task))
        task_parts.append(np.full(count, task_index, dtype=np.int64))
    if not sample_parts:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.stack([np.concatenate(task_parts), np.concatenate(sample_parts)], axis=1)
    shuffle = np.random.default_rng(stable_seed(seed, "epoch", epoch)).permutation(len(pairs))
    return pairs[shuffle]


def shard_for_rank(num_items: int, rank: int, world_size: int) -> slice:
    """The items one data-parallel rank takes: every `world_size`-th, starting at `rank`.

    Across ranks every item is taken exactly once. Ranks may therefore differ by one item
    when `world_size` does not divide `num_items`; the training loop handles the uneven end.

    Args:
        num_items: Length of the sequence being sharded (e.g. an epoch's draws).
        rank: This process's rank, in `[0, world_size)`.
        world_size: Number of data-parallel ranks, >= 1.

    Returns:
        A slice to index the sequence with, e.g. `order[shard_for_rank(len(order), r, w)]`.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    return slice(rank, num_items, world_size)
