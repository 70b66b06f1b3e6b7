"""Per-task validation: mean token loss, token accuracy and perplexity on each task's valid split."""

from __future__ import annotations

import math

import torch

from mftune.data.pipeline import MultiTaskData
from mftune.train.batches import collate, filler_batch, shard_micro_batches
from mftune.train.step import token_losses


@torch.no_grad()
def evaluate(
    accelerator, model, data: MultiTaskData, pad_id: int, micro_batch: int, chunk_size: int
) -> dict[str, float]:
    """Validation metrics: `valid/<task>/{loss,accuracy,ppl}` and their task-averaged `valid/{loss,accuracy}`.

    Each rank scores its share of every task's rows and sums are all-reduced, so the result is the same for
    any number of ranks. Every rank runs as many forward passes, as DDP's buffer sync and the weight
    gathering of ZeRO-3 and FSDP need: a short or empty share is made up with fillers that score nothing.
    """
    was_training = model.training
    model.eval()
    num_tasks = len(data.tasks)
    loss_sum = torch.zeros(num_tasks, dtype=torch.float64, device=accelerator.device)
    correct = torch.zeros_like(loss_sum)
    tokens = torch.zeros_like(loss_sum)
    for task in data.tasks:
        rows = data.valid_rows(task.task_id)
        shard = shard_micro_batches(rows, micro_batch, accelerator.process_index, accelerator.num_processes)
        for micro_rows in shard:
            batch = (
                collate(data, micro_rows, pad_id, valid=True) if micro_rows else filler_batch(data, pad_id)
            )
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = token_losses(model, batch, chunk_size)
            task_ids = out.targets.task_ids
            loss_sum.index_add_(0, task_ids, out.loss.double())
            correct.index_add_(0, task_ids, out.correct.double())
            tokens.index_add_(0, task_ids, torch.ones_like(out.loss, dtype=torch.float64))
    totals = accelerator.reduce(torch.stack([loss_sum, correct, tokens]), "sum").cpu()
    if was_training:
        model.train()
    metrics: dict[str, float] = {}
    losses, accuracies = [], []
    for task in data.tasks:
        loss_k, correct_k, tokens_k = (float(totals[j, task.task_id]) for j in range(3))
        if tokens_k == 0:
            continue
        mean = loss_k / tokens_k
        metrics[f"valid/{task.name}/loss"] = mean
        metrics[f"valid/{task.name}/accuracy"] = correct_k / tokens_k
        metrics[f"valid/{task.name}/ppl"] = math.exp(min(mean, 50.0))
        losses.append(mean)
        accuracies.append(correct_k / tokens_k)
    if losses:
        metrics["valid/loss"] = sum(losses) / len(losses)
        metrics["valid/accuracy"] = sum(accuracies) / len(accuracies)
    return metrics
