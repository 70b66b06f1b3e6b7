"""Per-task validation: mean token loss, token accuracy and perplexity on each task's valid split."""

from __future__ import annotations

import math

import torch

from mftune.data.pipeline import MultiTaskData
from mftune.loss.weighting import per_task_sums
from mftune.train.batches import collate, shard_micro_batches, to_device
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
            batch = to_device(collate(data, micro_rows, pad_id, valid=True), accelerator.device)
            out = token_losses(model, batch, chunk_size)
            sums = per_task_sums(out.loss, out.correct, out.targets, num_tasks)
            loss_sum += sums["loss_sum"]
            correct += sums["num_correct"]
            tokens += sums["num_tokens"]
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
