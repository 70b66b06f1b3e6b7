"""Show a tokenized sample with its trained tokens marked, or dump samples for tests and audits."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mftune.data.cache import TokenizedTask

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
