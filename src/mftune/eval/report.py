"""Writing evaluation results: results.json, samples.jsonl, a per-task table and a bar chart."""

from __future__ import annotations

import datetime
import json
import warnings
from pathlib import Path

from mftune.eval.problems import write_jsonl
from mftune.eval.scoring import TaskScores


def write_results(
    out_dir: Path,
    scores: dict[str, TaskScores],
    losses: dict[str, dict],
    header: dict,
) -> dict:
    """Write results.json (metrics per task), samples.jsonl and scores.png under `out_dir`.

    Args:
        out_dir: Created if missing; these three files are replaced.
        scores: Generation metrics and sample rows per task.
        losses: `loss`, `accuracy`, `ppl`, `samples` per training task (may be empty).
        header: What was evaluated (target, engine, sandbox isolation ...), written first.

    Returns:
        The results as written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, dict] = {}
    for name, loss in losses.items():
        tasks.setdefault(name, {})["loss"] = loss
    for name, task in scores.items():
        tasks.setdefault(name, {}).update(task.metrics)
    results = {**header, "date": datetime.datetime.now().isoformat(timespec="seconds"), "tasks": tasks}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    write_jsonl(out_dir / "samples.jsonl", [row for task in scores.values() for row in task.samples])
    plot_scores(tasks, out_dir / "scores.png")
    return results


def flat_metrics(tasks: dict[str, dict]) -> dict[str, float]:
    """`eval/<task>/<metric>` → value, for metrics.jsonl (loss also gives accuracy and ppl)."""
    flat = {}
    for name, metrics in tasks.items():
        for metric, entry in metrics.items():
            if metric == "loss":
                for key in ("loss", "accuracy", "ppl"):
                    flat[f"eval/{name}/{key}"] = entry[key]
            else:
                flat[f"eval/{name}/{metric}"] = entry["value"]
    return flat


def headline(metrics: dict) -> tuple[str, dict] | None:
    """The metric a task's bar shows: exact match, else its smallest-k pass@k."""
    if "exact_match" in metrics:
        return "exact_match", metrics["exact_match"]
    passes = sorted((int(m.split("@")[1]), m) for m in metrics if m.startswith("pass@"))
    return (passes[0][1], metrics[passes[0][1]]) if passes else None


def plot_scores(tasks: dict[str, dict], path: Path) -> Path | None:
    """A bar per task of its headline metric with a standard-error bar; None without matplotlib or scores."""
    bars = [(name, *h) for name, metrics in tasks.items() if (h := headline(metrics))]
    if not bars:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'mftune[plots]'); no chart", stacklevel=2)
        return None
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(bars)), 3.5))
    values = [entry["value"] for _, _, entry in bars]
    errors = [entry.get("stderr") or 0.0 for _, _, entry in bars]
    ax.bar(range(len(bars)), values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(bars)), [f"{name}\n{metric}" for name, metric, _ in bars], fontsize="small")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_table(tasks: dict[str, dict]) -> None:
    """The per-task table on the terminal (rich): loss, token accuracy, exact match, pass@k ± stderr."""
    from rich.console import Console
    from rich.table import Table

    columns = ["loss", "token acc"]
    generation = sorted(
        {m for metrics in tasks.values() for m in metrics if m != "loss"},
        key=lambda m: (m != "exact_match", int(m.split("@")[1]) if "@" in m else 0),
    )
    table = Table(title="mftune eval")
    table.add_column("task")
    for column in [*columns, *generation]:
        table.add_column(column, justify="right")
    for name, metrics in tasks.items():
        loss = metrics.get("loss")
        cells = [f"{loss['loss']:.3f}", f"{loss['accuracy']:.1%}"] if loss else ["", ""]
        for metric in generation:
            entry = metrics.get(metric)
            cells.append(_score_cell(entry) if entry else "")
        table.add_row(name, *cells)
    Console().print(table)


def _score_cell(entry: dict) -> str:
    stderr = f" ± {entry['stderr']:.1%}" if entry.get("stderr") is not None else ""
    return f"{entry['value']:.1%}{stderr} (n={entry['count']})"
