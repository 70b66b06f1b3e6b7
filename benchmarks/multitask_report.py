"""The multi-task quality study's report (benchmarks/multitask_quality.py): tables of scores with
intervals, paired differences, CoBa's time, the goal read as stated, and one PNG of curves per setup."""

from __future__ import annotations

import statistics
from pathlib import Path

from multitask_data import TASKS

ORDER = ("zero-shot", "single-epochs", "single-steps", "token", "mftcoder-task", "sample", "task",
         "task_sample", "coba", "coba-defaults")  # fmt: skip
OVERHEAD_GOAL = 0.05


def _cell(entry: dict) -> str:
    return f"{entry['value']:.1%} [{entry['low']:.1%}, {entry['high']:.1%}]"


def _diff(entry: dict) -> str:
    return f"{entry['value'] * 100:+.1f} [{entry['low'] * 100:+.1f}, {entry['high'] * 100:+.1f}] ({entry['wins']})"


def score_table(summary: dict) -> str:
    setups = [s for s in ORDER if s in summary["setups"]]
    head = ["setup", *TASKS, "mean task", "worst task"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in setups:
        row = summary["setups"][s]
        worst = f"{_cell(row['worst'])} ({row['worst_task']})"
        lines.append("| " + " | ".join([s, *(_cell(row[k]) for k in (*TASKS, "mean")), worst]) + " |")
    return "\n".join(lines)


def difference_table(summary: dict, baseline: str) -> str:
    rows = summary["differences"].get(baseline, {})
    head = ["setup − " + baseline, "mean task", "worst task", *TASKS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in ORDER:
        if s in rows and s != "zero-shot":
            lines.append(
                "| " + " | ".join([s, *(_diff(rows[s][k]) for k in ("mean", "worst", *TASKS))]) + " |"
            )
    return "\n".join(lines)


def loss_table(results: dict) -> str:
    """Mean final validation loss per setup and task, and training seconds per seed (a single-task row:
    its runs together)."""
    losses: dict = {}
    seconds: dict = {}
    for seed_result in results["by_seed"].values():
        for run in seed_result["runs"]:
            for t, v in run["valid_loss"].items():
                losses.setdefault(run["setup"], {}).setdefault(t, []).append(v)
            seconds[run["setup"]] = seconds.get(run["setup"], 0.0) + run["train_seconds"]
    head = ["setup", *TASKS, "train s per seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seeds = len(results["by_seed"])
    for s in ORDER:
        if s in losses:
            cells = [f"{statistics.mean(losses[s][t]):.3f}" if t in losses[s] else "-" for t in TASKS]
            lines.append("| " + " | ".join([s, *cells, f"{seconds[s] / seeds:.0f}"]) + " |")
    return "\n".join(lines)


def coba_lines(results: dict) -> list[str]:
    """CoBa's time: measured inside CoBa per run, and the interleaved A/B of wall times."""
    lines = []
    for setup in ("coba", "coba-defaults"):
        shares = [
            r["balancer_seconds"] / max(1e-9, r["train_seconds"] - r["balancer_seconds"])
            for s in results["by_seed"].values()
            for r in s["runs"]
            if r["setup"] == setup
        ]
        if shares:
            lines.append(
                f"- `{setup}`: time inside CoBa, share of the rest of training: "
                + " / ".join(f"{x:.1%}" for x in shares)
                + f" (mean {statistics.mean(shares):.1%})"
            )
    ab = results.get("ab") or []
    a = [r["train_seconds"] for r in ab if r["setup"] == "task"]
    b = [r["train_seconds"] for r in ab if r["setup"] == "coba-defaults"]
    if a and b:
        ratio = statistics.mean(b) / statistics.mean(a) - 1
        spread = (statistics.stdev(a) / statistics.mean(a)) if len(a) > 1 else float("nan")
        lines.append(
            f"- interleaved A/B ({''.join(results['spec']['ab_order'])}, {results['spec']['ab_steps']} steps each, "
            f"one run at a time): `task` {', '.join(f'{x:.1f}' for x in a)} s; `coba-defaults` "
            f"{', '.join(f'{x:.1f}' for x in b)} s; mean {ratio:+.1%} "
            f"(run-to-run spread of `task`: {spread:.1%})"
        )
    return lines


def goal_lines(summary: dict) -> list[str]:
    """The goal, read as stated: task or coba ≥ token and mftcoder-task on the worst and the mean task."""
    lines = []
    for baseline in ("token", "mftcoder-task"):
        for setup in ("task", "coba", "coba-defaults"):
            d = summary["differences"].get(baseline, {}).get(setup)
            if d is None:
                continue
            for key in ("worst", "mean"):
                e = d[key]
                verdict = (
                    "above, interval excludes 0" if e["low"] > 0 else
                    "below, interval excludes 0" if e["high"] < 0 else "not separated"
                )  # fmt: skip
                lines.append(f"- {setup} − {baseline}, {key} task: {_diff(e)}: {verdict}")
    return lines


def plot_setup(results: dict, setup: str, path: Path) -> Path | None:
    """Curves of one setup, mean over seeds: validation loss, CoBa weights and eval scores per task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for s in results["by_seed"].values() for r in s["runs"] if r["setup"] == setup]
    if not runs:
        return None
    panels = [("valid_loss", "validation loss"), ("weight", "CoBa weight"), ("score", "eval score (subset)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for task in TASKS:
            series = [r["curves"][key].get(task) for r in runs if r["curves"][key].get(task)]
            if not series:
                continue
            steps = [p[0] for p in series[0]]
            length = min(len(s) for s in series)
            mean = [statistics.mean(s[i][1] for s in series) for i in range(length)]
            ax.plot(steps[:length], mean, marker="o", markersize=3, label=task)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.suptitle(f"{setup} (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(results: dict, workdir: Path) -> str:
    """The markdown report (also written to `workdir/results.md`), with the plots under `workdir/plots/`."""
    summary = results["summary"]
    spec = results["spec"]
    n = {t: len(next(iter(results["outcomes"]["zero-shot"].values()))[t]) for t in TASKS}
    text = [
        f"command: {results['command']}",
        f"machine: {results['machine']}",
        f"size {results['size']}: seeds {results['seeds']}; {spec['steps']} steps of {spec['batch']} packed rows "
        f"of 256 tokens ({spec['accumulation']} micro-batches), lr {spec['learning_rate']:g} cosine to a tenth; "
        f"held-out problems per task: {', '.join(f'{t} {k}' for t, k in n.items())}; "
        f"{summary['draws']} bootstrap draws",
        f"pre-training: {results['pretrain']['minutes']:.1f} min "
        f"({'built' if results['pretrain']['built_now'] else 'cached'}); whole study {results['minutes']:.1f} min",
        "",
        "### Scores (mean over seeds, 95% bootstrap interval over seeds and problems)",
        "",
        score_table(summary),
        "",
        "### Paired differences against token (points; wins: seeds where the setup is above)",
        "",
        difference_table(summary, "token"),
        "",
        "### Paired differences against mftcoder-task",
        "",
        difference_table(summary, "mftcoder-task"),
        "",
        "### Final validation loss (mean over seeds) and training time",
        "",
        loss_table(results),
        "",
        "### CoBa's time",
        "",
        *coba_lines(results),
        "",
        "### The goal, as stated",
        "",
        *goal_lines(summary),
    ]
    plots = workdir / "plots"
    plots.mkdir(exist_ok=True)
    for setup in ORDER:
        plot_setup(results, setup, plots / f"{setup}.png")
    out = "\n".join(text)
    (workdir / "results.md").write_text(out + "\n")
    return out
