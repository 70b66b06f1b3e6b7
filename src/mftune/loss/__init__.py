"""The training loss: chunked per-token cross entropy, weighted by per-token coefficients.

One optimizer step, on each process:

1. `count_step` over the step's micro-batches, then `reduce_counts` (one all-reduce).
2. Per micro-batch: `select_targets`, the hidden states at `targets.positions`,
   `lm_head_loss` (or `token_cross_entropy`) for ℓ_i, `token_coefficients` for c_i,
   and the micro-batch's share of the step loss `(c * ℓ).sum()`.

The shares of all micro-batches and processes add up to the step's loss (DESIGN.md §3); the
training loop undoes the backend's own averaging over accumulation steps and processes.
"""

from mftune.loss.cross_entropy import lm_head_loss, logit_transform, token_cross_entropy
from mftune.loss.weighting import (
    STRATEGIES,
    StepCounts,
    Targets,
    count_step,
    per_task_sums,
    reduce_counts,
    select_targets,
    token_coefficients,
)

__all__ = [
    "STRATEGIES",
    "StepCounts",
    "Targets",
    "count_step",
    "lm_head_loss",
    "logit_transform",
    "per_task_sums",
    "reduce_counts",
    "select_targets",
    "token_coefficients",
    "token_cross_entropy",
]
