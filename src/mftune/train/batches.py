"""Which rows each rank trains on at each optimizer step, and the micro-batches they form.

An epoch's rows are a pure function of the epoch (`MultiTaskData.epoch_rows`), so the data position of a
run is just `(epoch, step_in_epoch)`: resuming needs no iterator state, only those two numbers.

Every rank runs the same number of forward and backward passes in a step (and in an evaluation): DDP
syncs buffers and gradients, ZeRO-3 and FSDP gather weights, in every pass. Where a rank runs out of rows
(an epoch's last, smaller step; a validation split with fewer rows than ranks) it gets empty micro-batches,
which `collate_micro_batches` turns into fillers whose tokens are all untrained: they add exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mftune.data.collate import Sample, collate_rows
from mftune.data.pipeline import MultiTaskData, Row


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes of a run.

    Attributes:
        global_batch: rows (packed) or samples (unpacked) per optimizer step, over all ranks.
        micro_batch: rows per forward/backward on one rank.
        world_size: number of processes.
        rank: this process.
    """

    global_batch: int
    micro_batch: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.global_batch % (self.micro_batch * self.world_size):
            raise ValueError(
                f"train.global_batch_size ({self.global_batch}) must be a multiple of micro_batch_size "
                f"({self.micro_batch}) x processes ({self.world_size})"
            )

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.global_batch // (self.micro_batch * self.world_size)


@dataclass(frozen=True)
class DataPosition:
    """Where the next optimizer step starts."""

    epoch: int = 0
    step_in_epoch: int = 0


def steps_in_epoch(num_rows: int, plan: BatchPlan) -> int:
    """Optimizer steps of an epoch; the last one may be smaller, so every row is trained once."""
    return math.ceil(num_rows / plan.global_batch)


def rows_for_step(rows: list[Row], step_in_epoch: int, plan: BatchPlan) -> list[list[Row]]:
    """This rank's micro-batches (lists of rows) for one optimizer step.

    The step's window of `global_batch` rows is dealt to ranks round-robin, so each row goes to exactly
    one rank, then cut into micro-batches; see `shard_micro_batches`.
    """
    window = rows[step_in_epoch * plan.global_batch : (step_in_epoch + 1) * plan.global_batch]
    return shard_micro_batches(window, plan.micro_batch, plan.rank, plan.world_size)


def shard_micro_batches(rows: list[Row], micro_batch: int, rank: int, world_size: int) -> list[list[Row]]:
    """Rank `rank`'s share of `rows` (every `world_size`-th row), cut into micro-batches.

    Every rank gets the same number of micro-batches, that of rank 0 (which holds the most rows); a rank
    with fewer rows gets empty micro-batches at the end.
    """
    mine = rows[rank::world_size]
    count = math.ceil(math.ceil(len(rows) / world_size) / micro_batch)
    return [mine[i * micro_batch : (i + 1) * micro_batch] for i in range(count)]


def iterate_steps(
    data: MultiTaskData, plan: BatchPlan, start: DataPosition
) -> Iterator[tuple[DataPosition, list[list[Row]]]]:
    """Endless (position, micro-batches) pairs from `start`, epoch after epoch."""
    epoch, step = start.epoch, start.step_in_epoch
    while True:
        rows = data.epoch_rows(epoch)
        for s in range(step, steps_in_epoch(len(rows), plan)):
            yield DataPosition(epoch, s), rows_for_step(rows, s, plan)
        epoch, step = epoch + 1, 0


def collate(data: MultiTaskData, rows: list[Row], pad_id: int, *, valid: bool = False) -> dict:
    """Tensors of one micro-batch, with `packed` telling the model how attention is isolated.

    No rows (a rank's share ran out) gives a filler (`filler_batch`).
    """
    if not rows:
        return filler_batch(data, pad_id)
    batch = collate_rows([data.row_samples(row, valid=valid) for row in rows], pad_id, isolated=data.isolated)
    batch["packed"] = data.packing != "none"
    return batch


def collate_micro_batches(
    data: MultiTaskData, micro_rows: list[list[Row]], pad_id: int, *, valid: bool = False
) -> list[dict]:
    """Tensors of each micro-batch; an empty one becomes a filler (`filler_batch`)."""
    return [collate(data, rows, pad_id, valid=valid) for rows in micro_rows]


def to_device(batch: dict, device) -> dict:
    """The batch with its tensors on `device` (flags such as `packed` stay as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def filler_batch(data: MultiTaskData, pad_id: int) -> dict:
    """A one-token micro-batch with no trained token, marked `filler`.

    Its forward and backward pass keep a rank in step with the others; its loss is exactly 0 and still
    depends on every weight, so every gradient (all zeros) is produced as DDP expects.
    """
    token = np.array([pad_id], dtype=np.int32)
    sample = Sample(input_ids=token, trained=np.zeros(1, dtype=bool), task_id=0, sample_id=-1)
    batch = collate_rows([[sample]], pad_id, isolated=data.isolated)
    batch["packed"] = data.packing != "none"
    batch["filler"] = True
    return batch
