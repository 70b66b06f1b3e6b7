"""`train.loss_scope: micro_batch` is MFTCoder's loss_func_mft, recomputed here by brute force from each
micro-batch's token losses: case1-case4 normalised within each micro-batch, the step their mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mftune.data.collate import Sample, collate_rows
from mftune.train.step import LossSpec, train_step

# Two micro-batches of one sample per row (packing: none, MFTCoder's padding): rows are samples.
# (task, length, trained tokens at the end). Unequal sample counts, so that even case2 tells a mean of
# micro-batch means from a mean over the step.
MICRO_BATCHES = [
    [(0, 9, 4), (1, 12, 7), (1, 6, 2)],
    [(0, 10, 6), (1, 11, 5)],
]
TASK_WEIGHTS = torch.tensor([1.0, 3.0])


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _micro_batches(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    batches, sample_id = [], 0
    for rows in MICRO_BATCHES:
        samples = []
        for task, length, trained in rows:
            mask = np.zeros(length, dtype=bool)
            mask[length - trained :] = True
            samples.append([Sample(rng.integers(10, 4000, length).astype(np.int32), mask, task, sample_id)])
            sample_id += 1
        batch = collate_rows(samples, pad_id=0)
        batch["packed"] = False
        batches.append(batch)
    return batches


def _row_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross entropy (B, T-1) from full logits, and the mask of trained targets."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    losses = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return losses * mask, mask.double()


def mftcoder_micro_batch_loss(losses: torch.Tensor, mask: torch.Tensor, tasks: list[int], mode: str) -> float:
    """MFTCoder's per-micro-batch formulas, written out: rows are samples, one task per row."""
    losses, mask = losses.double(), mask.double()
    row_sum, row_count = losses.sum(1), mask.sum(1)
    if mode == "case1":
        return float(row_sum.sum() / row_count.sum())
    if mode == "case2":
        return float((row_sum / row_count).mean())
    total = weights = 0.0
    for task in sorted(set(tasks)):
        rows = torch.tensor([t == task for t in tasks])
        w = float(TASK_WEIGHTS[task])
        if mode == "case3":
            total += w * float(row_sum[rows].sum() / row_count[rows].sum())
        else:  # case4
            total += w * float((row_sum[rows] / row_count[rows]).mean())
        weights += w
    return total / weights


def _step_loss(model, batches: list[dict], strategy: str, scope: str) -> float:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    spec = LossSpec(strategy, TASK_WEIGHTS.clone(), scope=scope)
    result = train_step(accelerator, model, optimizer, scheduler, batches, spec, max_grad_norm=1.0)
    return result.loss


@pytest.mark.parametrize("mode", ["case1", "case2", "case3", "case4"])
def test_micro_batch_scope_is_mftcoders_loss(model, mode: str) -> None:
    batches = _micro_batches()
    expected = np.mean(
        [
            mftcoder_micro_batch_loss(*_row_losses(model, b), [task for task, _, _ in rows], mode)
            for b, rows in zip(batches, MICRO_BATCHES, strict=True)
        ]
    )
    assert _step_loss(model, batches, mode, "micro_batch") == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mode", ["case1", "case2", "case3", "case4"])
def test_step_scope_differs_when_a_step_accumulates(model, mode: str) -> None:
    batches = _micro_batches()
    per_micro = _step_loss(model, batches, mode, "micro_batch")
    per_step = _step_loss(model, batches, mode, "step")
    assert abs(per_micro - per_step) > 1e-4
    # With a single micro-batch the two scopes are the same normalisation.
    assert _step_loss(model, batches[:1], mode, "micro_batch") == pytest.approx(
        _step_loss(model, batches[:1], mode, "step"), rel=1e-6
    )


def test_step_scope_is_the_same_formula_over_the_whole_step(model) -> None:
    # case3 over the step: every task's token mean over both micro-batches, weighted.
    batches = _micro_batches()
    parts = [_row_losses(model, b) for b in batches]
    tasks = [[task for task, _, _ in rows] for rows in MICRO_BATCHES]
    losses = torch.cat([p[0].sum(1) for p in parts]).double()
    counts = torch.cat([p[1].sum(1) for p in parts])
    row_tasks = torch.tensor([t for ts in tasks for t in ts])
    means = [float(losses[row_tasks == k].sum() / counts[row_tasks == k].sum()) for k in (0, 1)]
    expected = (1.0 * means[0] + 3.0 * means[1]) / 4.0
    assert _step_loss(model, batches, "case3", "step") == pytest.approx(expected, rel=1e-5)


def test_mftcoder_configs_normalise_per_micro_batch() -> None:
    from mftune.config.mftcoder import from_mftcoder

    raw, _ = from_mftcoder({"data_paths": "[/tmp]", "model_type": "llama", "pretrained_model_path": "/m",
                            "output_dir": "/o", "weighted_loss_mode": "case4"})  # fmt: skip
    assert raw["train"]["loss"] == "case4" and raw["train"]["loss_scope"] == "micro_batch"
