"""Show a tokenized sample with its trained tokens marked, or dump samples or packed rows for tests and audits."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mftune.data.cache import TokenizedTask
from mftune.data.collate import collate_rows
from mftune.data.pipeline import MultiTaskData

_ANSI_ON, _ANSI_OFF = "\x1b[1;32m", "\x1b[0m"
_PLAIN_ON, _PLAIN_OFF = "⟦", "⟧"


def highlight(tokenizer, input_ids: np.ndarray, trained: np.ndarray, *, color: bool) -> str:
    """The decoded sample with every run of trained tokens wrapped in markers (ANSI colour on a terminal).

    Runs are decoded as a whole so multi-byte characters split across tokens stay readable.
    """
    on, off = (_ANSI_ON, _ANSI_OFF) if color else (_PLAIN_ON, _PLAIN_OFF)
    out = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or trained[end] != trained[start]:
            text = tokenizer.decode(list(map(int, input_ids[start:end])), skip_special_tokens=False)
            out.append(f"{on}{text}{off}" if trained[start] else text)
            start = end
    return "".join(out)


def labels_of(input_ids: np.ndarray, trained: np.ndarray) -> list[int]:
    """Hugging Face labels: the token id where trained, -100 elsewhere."""
    return np.where(trained, input_ids, -100).astype(int).tolist()


def dump_samples(tokenizer, tasks: Iterable[TokenizedTask], path: str | Path) -> int:
    """Write one JSON object per sample (task, source, input_ids, labels, text); return how many.

    This file is the data pipeline's contract (DESIGN.md §8).
    """
    count = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for task in tasks:
            for i in range(len(task)):
                ids, trained = task.sample(i)
                record = {
                    "task": task.name,
                    "source": task.source(i),
                    "input_ids": ids.astype(int).tolist(),
                    "labels": labels_of(ids, trained),
                    "text": tokenizer.decode(list(map(int, ids)), skip_special_tokens=False),
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    return count


def dump_rows(data: MultiTaskData, path: str | Path, epoch: int = 0, pad_id: int = 0) -> int:
    """Write the training rows of one epoch as `data.packing` builds them, one JSON object per row, in
    training order; return how many.

    Each row: `input_ids`, `labels` (as the loss sees them: -100 where untrained and on each
    sample's first token) and `pieces`, one per sample or part of one: `task`, `sample` (its index
    in the task), `source` (file:line), `start` and `end` (its tokens within the sample) and
    `offset` (where it starts in the row).
    """
    count = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for row in data.epoch_rows(epoch):
            batch = collate_rows([data.row_samples(row)], pad_id, isolated=data.isolated)
            pieces, offset = [], 0
            for task_id, index, start, end in row:
                task = data.tasks[task_id]
                pieces.append(
                    {
                        "task": task.name,
                        "sample": index,
                        "source": task.tokenized.source(index),
                        "start": start,
                        "end": end,
                        "offset": offset,
                    }
                )
                offset += end - start
            record = {
                "input_ids": batch["input_ids"][0].tolist(),
                "labels": batch["labels"][0].tolist(),
                "pieces": pieces,
            }
            f.write(json.dumps(record) + "\n")
            count += 1
    return count
