"""One optimizer step: counts for the whole step first, then forward/backward per micro-batch, then update.

The loss of a step is Σ c_i ℓ_i over all its trained tokens, on all micro-batches and ranks
(DESIGN.md §3). Counts are all-reduced once, before any forward, so each micro-batch's loss is already
its exact share of the step's loss and gradients simply add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mftune.loss.cross_entropy import lm_head_loss
from mftune.loss.weighting import (
    StepCounts,
    count_step,
    per_task_sums,
    reduce_counts,
    select_targets,
    token_coefficients,
)
from mftune.model.hidden import forward_hidden, model_config, output_head
from mftune.train.batches import to_device
from mftune.train.distributed import backend_loss_scale, micro_batch_context


@dataclass
class LossSpec:
    """How token losses become a step loss: the strategy, per-task weights (K,), the CE chunk size, and
    where the strategy normalises (`step`, or `micro_batch` as MFTCoder does)."""

    strategy: str
    task_weights: torch.Tensor
    chunk_size: int = 2048
    scope: str = "step"


@dataclass
class TokenLosses:
    """Per-token results of one micro-batch's forward pass."""

    loss: torch.Tensor  # (N,) float32 cross entropy
    correct: torch.Tensor  # (N,) bool
    targets: object  # mftune.loss.weighting.Targets
    router_loss: torch.Tensor | None = (
        None  # mixture-of-experts load balancing, already scaled by its coefficient
    )


def token_losses(model: torch.nn.Module, batch: dict, chunk_size: int) -> TokenLosses:
    """Cross entropy of every trained target of a micro-batch, without full-vocabulary logits."""
    targets = select_targets(batch)
    hidden, router_loss = forward_hidden(model, batch, packed=batch["packed"])
    config = model_config(model)
    loss, correct = lm_head_loss(
        output_head(model), hidden[targets.positions], targets.token_ids, chunk_size, config=config
    )
    return TokenLosses(loss, correct, targets, router_loss)


def weighted_loss(
    model, batch: dict, counts: StepCounts, spec: LossSpec, router_share: float = 1.0, share: float = 1.0
) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the step loss, and its per-task sums for logging.

    `counts` are the step's (loss_scope step) or this micro-batch's own (micro_batch, with `share` its
    weight in the step's mean). A mixture-of-experts model's router loss is a mean per micro-batch:
    each micro-batch adds `router_share` (1 / micro-batches of the step over all ranks) of it, so the
    step adds their mean.
    """
    out = token_losses(model, batch, spec.chunk_size)
    coefficients = share * token_coefficients(
        out.targets, counts, spec.strategy, spec.task_weights.to(out.loss.device)
    )
    sums = per_task_sums(out.loss.detach(), out.correct, out.targets, len(spec.task_weights))
    weight_mass = torch.zeros(len(spec.task_weights), device=out.loss.device)
    weight_mass.index_add_(0, out.targets.task_ids, coefficients.detach())
    sums["weight"] = weight_mass
    loss = (coefficients * out.loss).sum()
    if out.router_loss is not None:
        loss = loss + router_share * out.router_loss
    return loss, sums


@dataclass
class StepResult:
    """What one optimizer step did, summed over ranks.

    `num_tokens` counts trained target tokens (the loss's N); `num_input_tokens` every non-padding token.
    """

    loss: float
    grad_norm: float
    num_tokens: int
    num_input_tokens: int
    per_task: dict[str, torch.Tensor]


def train_step(
    accelerator, model, optimizer, scheduler, micro_batches: list[dict], spec: LossSpec, max_grad_norm: float
) -> StepResult:
    """Run one optimizer step over this rank's micro-batches.

    Args:
        accelerator: the run's `accelerate.Accelerator` (gradient accumulation is done here, not by it).
        micro_batches: collated micro-batches of this rank for this step, as many on every rank; a
            `filler` one (see `mftune.train.batches.filler_batch`) adds nothing to loss or gradients.
    """
    num_tasks = len(spec.task_weights)
    counts = reduce_counts(count_step(micro_batches, num_tasks), lambda t: accelerator.reduce(t, "sum"))
    # micro_batch scope (MFTCoder's normalisation): each micro-batch's coefficients come from its own
    # counts, and the step is the mean over every real micro-batch of every process, as accumulation
    # dividing by its steps and DDP averaging over devices make it in MFTCoder.
    per_micro_batch = spec.scope == "micro_batch"
    if per_micro_batch:
        real = torch.tensor(float(sum(not b.get("filler") for b in micro_batches)), device=accelerator.device)
        micro_batch_share = 1.0 / max(1.0, float(accelerator.reduce(real, "sum")))
    scale = backend_loss_scale(accelerator)
    # Every micro-batch but a filler adds its share of the router loss (a filler appears only on an
    # epoch's last step, which then weighs the router loss slightly less).
    router_share = 1.0 / max(1, len(micro_batches) * accelerator.num_processes)
    step_loss = torch.zeros((), device=accelerator.device)
    input_tokens = torch.tensor(
        float(sum(int(b["attention_mask"].sum()) for b in micro_batches if not b.get("filler"))),
        device=accelerator.device,
    )
    totals: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, accelerator.device)
        share = 0.0 if batch.get("filler") else router_share
        with micro_batch_context(accelerator, model, sync=i == len(micro_batches) - 1):
            if per_micro_batch:
                own = count_step([batch], num_tasks)
                loss, sums = weighted_loss(model, batch, own, spec, share, micro_batch_share)
            else:
                loss, sums = weighted_loss(model, batch, counts, spec, share)
            accelerator.backward(loss * scale)
        step_loss += loss.detach()
        for key, value in sums.items():
            totals[key] = totals.get(key, 0) + value
    grad_norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    reduced = {k: accelerator.reduce(v.float(), "sum") for k, v in totals.items()} if totals else {}
    return StepResult(
        loss=float(accelerator.reduce(step_loss, "sum")),
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        num_tokens=int(counts.num_tokens),
        num_input_tokens=int(accelerator.reduce(input_tokens, "sum")),
        per_task=reduced,
    )
