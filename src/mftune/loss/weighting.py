"""Task weighting as per-token coefficients (DESIGN.md §3).

A step's loss is `Σ_i c_i · ℓ_i` over every trained target token i of the optimizer step, on
every micro-batch and every rank. The coefficients come from counts of the whole step, which
are all-reduced once, so a strategy means the same thing whatever the micro-batch size, the
gradient accumulation and the number of processes. This is hand-written because the
coefficients *are* mftune's product: no library weighs tokens by task and sample this way.

Counting rules:

- A target is a position t whose next label `labels[t+1]` is not -100; it belongs to the task
  and sample of position t+1.
- A sample is counted once per micro-batch in which it has targets, and samples without any
  target are not counted. Under no packing and isolated packing a sample never spans
  micro-batches, so this is simply the number of trained samples. Under contiguous packing a
  sample split across rows counts once per piece (the collator gives each piece its own
  sample index), and `n_s` is the piece's target count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mftune.config.schema import LOSS_ALIASES
from mftune.data.collate import IGNORE_INDEX

STRATEGIES = ("token", "sample", "task", "task_sample", "coba")

_COUNT_DTYPE = torch.float64  # exact integer counts up to 2**53


@dataclass(frozen=True)
class Targets:
    """The shifted prediction targets of one micro-batch, N of them, in row-major order.

    Attributes:
        positions: Bool, shape (B, T): True at input positions t whose next token is a
            target. `hidden[positions]` gives the (N, H) hidden states that predict them.
            The last column is always False.
        token_ids: Target token ids `labels[t+1]`, long, shape (N,).
        task_ids: Task of each target (that of position t+1), long, shape (N,).
        sample_ids: Sample index within the micro-batch of each target (of position t+1),
            long, shape (N,).
    """

    positions: torch.Tensor
    token_ids: torch.Tensor
    task_ids: torch.Tensor
    sample_ids: torch.Tensor

    @property
    def num_targets(self) -> int:
        """N, the number of targets."""
        return self.token_ids.numel()


def select_targets(batch: Mapping[str, torch.Tensor]) -> Targets:
    """Find the prediction targets of a collated micro-batch.

    Args:
        batch: Output of `mftune.data.collate.collate_rows`; uses `labels`, `task_ids` and
            `sample_ids`, each (B, T) long.

    Returns:
        The micro-batch's targets.
    """
    labels = batch["labels"]
    next_is_target = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): is labels[t+1] trained?
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = next_is_target
    return Targets(
        positions=positions,
        token_ids=labels[:, 1:][next_is_target],
        task_ids=batch["task_ids"][:, 1:][next_is_target],
        sample_ids=batch["sample_ids"][:, 1:][next_is_target],
    )


@dataclass(frozen=True)
class StepCounts:
    """Target and sample counts of one optimizer step, per task.

    Attributes:
        tokens_per_task: N_k, targets of each task, float64, shape (K,).
        samples_per_task: S_k, samples with targets of each task, float64, shape (K,).
    """

    tokens_per_task: torch.Tensor
    samples_per_task: torch.Tensor

    @property
    def num_tokens(self) -> torch.Tensor:
        """N, all targets of the step, float64 scalar."""
        return self.tokens_per_task.sum()

    @property
    def num_samples(self) -> torch.Tensor:
        """S, all samples of the step, float64 scalar."""
        return self.samples_per_task.sum()

    def to(self, device: torch.device | str) -> StepCounts:
        """The same counts on `device` (e.g. the GPU, before an NCCL all-reduce)."""
        return StepCounts(self.tokens_per_task.to(device), self.samples_per_task.to(device))


def count_step(micro_batches: Sequence[Mapping[str, torch.Tensor]], num_tasks: int) -> StepCounts:
    """Count the local targets and samples of one optimizer step.

    Args:
        micro_batches: Every micro-batch of the step on this process, as collated.
        num_tasks: K.

    Returns:
        Counts on the device of the micro-batches' labels (CPU when there are none).

    Raises:
        ValueError: If a target's task id is outside [0, K).
    """
    device = micro_batches[0]["labels"].device if micro_batches else torch.device("cpu")
    tokens = torch.zeros(num_tasks, dtype=_COUNT_DTYPE, device=device)
    samples = torch.zeros(num_tasks, dtype=_COUNT_DTYPE, device=device)
    for batch in micro_batches:
        targets = select_targets(batch)
        if targets.num_targets == 0:
            continue
        _check_task_ids(targets.task_ids, num_tasks)
        tokens += torch.bincount(targets.task_ids, minlength=num_tasks)
        # Every token of a sample has the same task, so scattering task ids by sample index
        # gives each sample's task; `has_targets` keeps the samples seen among the targets.
        num_local = int(targets.sample_ids.max()) + 1
        sample_task = torch.zeros(num_local, dtype=torch.long, device=device)
        sample_task.scatter_(0, targets.sample_ids, targets.task_ids)
        has_targets = torch.bincount(targets.sample_ids, minlength=num_local) > 0
        samples += torch.bincount(sample_task[has_targets], minlength=num_tasks)
    return StepCounts(tokens, samples)


def reduce_counts(counts: StepCounts, reduce_fn: Callable[[torch.Tensor], torch.Tensor | None]) -> StepCounts:
    """Sum the step's counts over all processes with a single all-reduce.

    Args:
        counts: This process's counts.
        reduce_fn: SUM all-reduce of one tensor, e.g. `lambda t: accelerator.reduce(t, "sum")`.
            An in-place reduce that returns None (`torch.distributed.all_reduce`) also works.

    Returns:
        The global counts.
    """
    num_tasks = counts.tokens_per_task.numel()
    packed = torch.cat([counts.tokens_per_task, counts.samples_per_task])
    reduced = reduce_fn(packed)
    if reduced is None:
        reduced = packed
    return StepCounts(reduced[:num_tasks], reduced[num_tasks:])


def token_coefficients(
    targets: Targets, counts: StepCounts, strategy: str, task_weights: torch.Tensor
) -> torch.Tensor:
    """Coefficient c_i of each target of a micro-batch in the step's loss `Σ_i c_i ℓ_i`.

    With N, N_k, S, S_k from `counts` (the whole step), n_s the targets of sample s in this
    micro-batch, K* the tasks with N_k > 0 and W = Σ_{j∈K*} w_j:

    - `token`: 1/N.
    - `sample`: 1/(S · n_s).
    - `task` and `coba`: w_k / (N_k · W).
    - `task_sample`: w_k / (S_k · n_s · W).

    Over a whole step the coefficients of every strategy sum to 1.

    Args:
        targets: The micro-batch's targets (N of them).
        counts: Global counts of the step, including these targets.
        strategy: One of `STRATEGIES`, or an MFTCoder alias (`case1`-`case4`).
        task_weights: w_k, shape (K,); only their ratios matter (ignored by token and sample).

    Returns:
        Float32, shape (N,), on the device of the targets, without gradient. A zero
        denominator (possible only if `counts` misses these targets) yields 0.

    Raises:
        ValueError: For an unknown strategy or task weights of the wrong shape.
    """
    strategy = LOSS_ALIASES.get(strategy, strategy)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown loss strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    num_tasks = counts.tokens_per_task.numel()
    if task_weights.shape != (num_tasks,):
        raise ValueError(f"task_weights has shape {tuple(task_weights.shape)}, expected ({num_tasks},)")
    device = targets.token_ids.device
    if targets.num_targets == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)

    tokens_per_task = counts.tokens_per_task.to(device, _COUNT_DTYPE)
    samples_per_task = counts.samples_per_task.to(device, _COUNT_DTYPE)
    task = targets.task_ids
    sample_sizes = torch.bincount(targets.sample_ids).to(_COUNT_DTYPE)[targets.sample_ids]  # n_s per target
    weights = task_weights.detach().to(device, _COUNT_DTYPE)
    total_weight = weights[tokens_per_task > 0].sum()  # W over the tasks present in the step

    if strategy == "token":
        numerator, denominator = torch.ones_like(sample_sizes), tokens_per_task.sum().expand_as(sample_sizes)
    elif strategy == "sample":
        numerator, denominator = torch.ones_like(sample_sizes), samples_per_task.sum() * sample_sizes
    elif strategy in ("task", "coba"):
        numerator, denominator = weights[task], tokens_per_task[task] * total_weight
    else:  # task_sample
        numerator, denominator = weights[task], samples_per_task[task] * sample_sizes * total_weight
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, 0.0).float()


def per_task_sums(
    per_token_loss: torch.Tensor, correct: torch.Tensor, targets: Targets, num_tasks: int
) -> dict[str, torch.Tensor]:
    """Per-task sums for logging mean token loss and token accuracy.

    Sum these over the step's micro-batches (and processes), then divide by `num_tokens`.

    Args:
        per_token_loss: ℓ_i, shape (N,).
        correct: Whether the argmax prediction is the target, bool, shape (N,).
        targets: The micro-batch's targets.
        num_tasks: K.

    Returns:
        `loss_sum`, `num_correct` and `num_tokens`, each float64 of shape (K,), detached.
    """
    task = targets.task_ids

    def task_sum(values: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(num_tasks, dtype=_COUNT_DTYPE, device=values.device)
        return zeros.index_add_(0, task, values.detach().to(_COUNT_DTYPE))

    return {
        "loss_sum": task_sum(per_token_loss),
        "num_correct": task_sum(correct),
        "num_tokens": task_sum(torch.ones_like(per_token_loss)),
    }


def _check_task_ids(task_ids: torch.Tensor, num_tasks: int) -> None:
    low, high = int(task_ids.min()), int(task_ids.max())
    if low < 0 or high >= num_tasks:
        raise ValueError(f"a target has task id {low if low < 0 else high}, outside [0, {num_tasks})")
