"""AdamW without decay on biases and norms, and the learning-rate schedule, stepped once per optimizer step."""

from __future__ import annotations

import math

import torch

from mftune.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; 1-D tensors (biases, norm scales) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) and bool(decay + no_decay)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=fused or None,
    )


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """`warmup_steps`, or `warmup_ratio` of the run."""
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def lr_factor(
    step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float, mode: str = "decay"
) -> float:
    """The learning rate at `step` (0-based, before that step's update) as a fraction of the peak.

    `decay`: linear warmup over `warmup` steps ((step + 1) / warmup), then `cosine` or `linear` decay to
    `min_ratio` at `total_steps`, or `constant`. `floor`: the schedule transformers' `get_scheduler`
    builds (warmup step / warmup, then a decay to 0), clamped from below at `min_ratio` (what MFTCoder
    trains with: it resets the rate to `min_lr` after every scheduler step that goes below it).
    """
    if mode == "floor":
        return max(_transformers_factor(step, total_steps, warmup, schedule), min_ratio)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def _transformers_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    # transformers' linear, cosine (one half cycle) and constant-with-warmup lambdas.
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor`; call `.step()` once after every optimizer step."""
    warmup = warmup_steps(cfg, total_steps)
    min_ratio = cfg.min_lr / cfg.learning_rate if cfg.learning_rate else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, warmup, cfg.lr_schedule, min_ratio, cfg.min_lr_mode),
    )
