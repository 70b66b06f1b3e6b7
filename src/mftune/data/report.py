"""The per-task data report that `mftune data validate` prints and training logs."""

from __future__ import annotations

import numpy as np

from mftune.data.packing import fill_ratio, pack_isolated
from mftune.data.pipeline import MultiTaskData

COLUMNS = (
    "task",
    "records",
    "errors",
    "kept",
    "overlong",
    "truncated",
    "train",
    "valid",
    "test",
    "per_epoch",
    "tokens",
    "trained",
    "len_p50",
    "len_p90",
    "len_p99",
    "len_max",
    "fill",
)


def task_rows(data: MultiTaskData) -> list[dict[str, object]]:
    """One dict per task with the report's columns, plus an `all` row."""
    # With every record bad there is no mixture to draw from, but the report must still print.
    trainable = any(len(t.train) for t in data.tasks)
    per_epoch = data.epoch_counts() if trainable else dict.fromkeys(data.task_names, 0)
    rows = []
    for task in data.tasks:
        tok = task.tokenized
        lengths = tok.lengths
        row: dict[str, object] = {
            "task": task.name,
            **{k: tok.counts[k] for k in ("records", "errors", "kept")},
        }
        row.update(
            overlong=tok.counts["overlong"],
            truncated=tok.counts["truncated"],
            train=len(task.train),
            valid=len(task.valid),
            test=len(task.test),
            per_epoch=per_epoch[task.name],
            tokens=int(lengths.sum()),
            trained=int(np.asarray(tok.trained).sum()),
            **_percentiles(lengths),
            fill=_fill(lengths[task.train], data),
        )
        rows.append(row)
    total: dict[str, object] = {"task": "all"}
    for key in COLUMNS[1 : COLUMNS.index("trained") + 1]:
        total[key] = sum(int(r[key]) for r in rows)  # type: ignore[call-overload]
    all_lengths = np.concatenate([t.tokenized.lengths for t in data.tasks])
    total.update(_percentiles(all_lengths))
    total["fill"] = _epoch_fill(data)
    return [*rows, total]


def _percentiles(lengths: np.ndarray) -> dict[str, int]:
    if len(lengths) == 0:
        return {"len_p50": 0, "len_p90": 0, "len_p99": 0, "len_max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"len_p50": int(p50), "len_p90": int(p90), "len_p99": int(p99), "len_max": int(lengths.max())}


def _fill(lengths: np.ndarray, data: MultiTaskData) -> str:
    if data.packing != "isolated" or len(lengths) == 0:
        return "-"
    rows = pack_isolated(lengths, data.max_len, data.packing_window)
    return f"{fill_ratio([int(lengths[r].sum()) for r in rows], data.max_len):.3f}"


def _epoch_fill(data: MultiTaskData) -> str:
    if data.packing == "none" or not any(len(t.train) for t in data.tasks):
        return "-"
    rows = data.epoch_rows(0)
    return f"{fill_ratio([sum(e - s for _, _, s, e in row) for row in rows], data.max_len):.3f}"


def format_table(rows: list[dict[str, object]]) -> str:
    """Rows as an aligned plain-text table."""
    cells = [list(COLUMNS)] + [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
