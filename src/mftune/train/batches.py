"""Which rows each rank trains on at each optimizer step, and the micro-batches they form.

An epoch's rows are a pure function of the epoch (`MultiTaskData.epoch_rows`), so the data position of a
run is just `(epoch, step_in_epoch)`: resuming needs no iterator state, only those two numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from mftune.data.collate import collate_rows
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
    one rank, then cut into micro-batches.
    """
    window = rows[step_in_epoch * plan.global_batch : (step_in_epoch + 1) * plan.global_batch]
    mine = window[plan.rank :: plan.world_size]
    return [mine[i : i + plan.micro_batch] for i in range(0, len(mine), plan.micro_batch)]


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
    """Tensors of one micro-batch, with `packed` telling the model how attention is isolated."""
    batch = collate_rows(
        [data.row_samples(row, valid=valid) for row in rows], pad_id, isolated=data.packing != "contiguous"
    )
    batch["packed"] = data.packing != "none"
    return batch
