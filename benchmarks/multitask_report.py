"""The multi-task quality benchmark's report (benchmarks/multitask_quality.py): per-task exact match and
loss of every setup, CoBa's time overhead, the goal checked as stated, and the mean over seeds."""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("arithmetic", "list_ops", "write_function", "write_test")
STATIC = ("token", "sample", "task", "task_sample")
SETUPS = (*STATIC, "coba", "coba-defaults")
OVERHEAD_GOAL = 0.05


@dataclass
class Row:
    """One line of the table: a setup's per-task results and its training time."""

    name: str
    per_task: dict[str, dict]
    seconds: float

    @property
    def complete(self) -> bool:
        return set(self.per_task) == set(TASKS)

    @property
    def mean(self) -> float:
        return sum(self.per_task[t]["exact"] for t in TASKS) / len(TASKS)

    @property
    def worst(self) -> tuple[float, str]:
        task = min(TASKS, key=lambda t: self.per_task[t]["exact"])
        return self.per_task[task]["exact"], task


def table_rows(results: list[dict]) -> list[Row]:
    """One row per setup; the single-task runs fold into one row (its time: all of them together)."""
    rows = []
    single = {r["tasks"][0]: r for r in results if r["name"].startswith("single-")}
    if single:
        per_task = {t: r["per_task"][t] for t, r in single.items()}
        rows.append(Row("single-task", per_task, sum(r["train_seconds"] for r in single.values())))
    rows += [Row(r["name"], r["per_task"], r["train_seconds"]) for r in results if r["name"] in SETUPS]
    return rows


def table(rows: list[Row]) -> str:
    head = ["setup", *(f"{t} EM / loss" for t in TASKS), "mean EM", "worst EM", "mean loss", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.name]
        for t in TASKS:
            v = row.per_task.get(t)
            cells.append(f"{v['exact']:.1%} / {v['valid_loss']:.3f}" if v else "-")
        if row.complete:
            worst, task = row.worst
            loss = sum(row.per_task[t]["valid_loss"] for t in TASKS) / len(TASKS)
            cells += [f"{row.mean:.1%}", f"{worst:.1%} ({task})", f"{loss:.3f}"]
        else:
            cells += ["-", "-", "-"]
        cells.append(f"{row.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead_lines(results: list[dict]) -> list[str]:
    """CoBa's time against `task`: wall time of the whole run, and the time measured inside CoBa."""
    by_name = {r["name"]: r for r in results}
    task = by_name.get("task")
    lines = []
    static = [by_name[s]["train_seconds"] for s in STATIC if s in by_name]
    if len(static) > 1:
        spread = (max(static) - min(static)) / min(static)
        lines.append(
            f"static strategies (same work per step): train time {min(static):.1f}-{max(static):.1f} s, "
            f"a spread of {spread:.1%}: the timing noise of this machine"
        )
    for name in ("coba", "coba-defaults"):
        coba = by_name.get(name)
        if coba is None:
            continue
        settings = ", ".join(f"{k} {v}" for k, v in coba["coba"].items()) or "defaults"
        inside = coba["balancer_seconds"] / (coba["train_seconds"] - coba["balancer_seconds"])
        line = f"{name} ({settings}): time inside CoBa (probes and weight updates) {coba['balancer_seconds']:.1f} s = {inside:.1%} of the rest of the run"
        if task is not None:
            wall = (coba["train_seconds"] - task["train_seconds"]) / task["train_seconds"]
            line += f"; wall time vs task {wall:+.1%} ({coba['train_seconds']:.1f} s vs {task['train_seconds']:.1f} s)"
        lines.append(line)
        if coba["coba_weights"]:
            final = ", ".join(f"{t} {w[-1]:.2f}" for t, w in coba["coba_weights"].items())
            mean = ", ".join(f"{t} {sum(w) / len(w):.2f}" for t, w in coba["coba_weights"].items())
            lines.append(f"{name} task weights: final {final}; mean over the run {mean}")
    return lines


def goal_lines(rows: list[Row], results: list[dict]) -> list[str]:
    """The issue's goal, checked as stated: worst task vs every static strategy, mean vs task, overhead."""
    by_name = {r.name: r for r in rows if r.complete}
    static = [by_name[s] for s in STATIC if s in by_name]
    task = by_name.get("task")
    runs = {r["name"]: r for r in results}
    lines = []
    for name in ("coba", "coba-defaults"):
        coba = by_name.get(name)
        if coba is None or not static or task is None:
            continue
        best_static = max(static, key=lambda r: r.worst[0])
        worst_ok = coba.worst[0] >= best_static.worst[0]
        mean_ok = coba.mean >= task.mean
        r = runs[name]
        inside = r["balancer_seconds"] / (r["train_seconds"] - r["balancer_seconds"])
        lines.append(
            f"{name}: worst task {coba.worst[0]:.1%} vs best static worst {best_static.worst[0]:.1%} "
            f"({best_static.name}) {'MET' if worst_ok else 'NOT MET'}; mean {coba.mean:.1%} vs task "
            f"{task.mean:.1%} {'MET' if mean_ok else 'NOT MET'}; measured overhead {inside:.1%} "
            f"{'under' if inside < OVERHEAD_GOAL else 'NOT under'} {OVERHEAD_GOAL:.0%}"
        )
    return lines


def seed_report(seed: int, results: list[dict]) -> list[str]:
    rows = table_rows(results)
    return [f"### seed {seed}", "", table(rows), "", *overhead_lines(results), *goal_lines(rows, results), ""]


def mean_table(by_seed: dict[int, list[dict]]) -> list[str]:
    """Each setup's per-task exact match averaged over the seeds (with the range), and the goal per seed."""
    tables = {seed: {row.name: row for row in table_rows(results)} for seed, results in by_seed.items()}
    names = [name for name in next(iter(tables.values())) if all(name in t for t in tables.values())]
    head = ["setup", *(f"{t} EM" for t in TASKS), "mean EM", "worst EM", "mean loss"]
    lines = [
        f"### mean over seeds {', '.join(map(str, by_seed))} (min-max over seeds)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name in names:
        rows = [t[name] for t in tables.values()]
        cells = [name]
        for task in TASKS:
            ems = [r.per_task[task]["exact"] for r in rows if task in r.per_task]
            cells.append(f"{sum(ems) / len(ems):.1%} ({min(ems):.0%}-{max(ems):.0%})" if ems else "-")
        if all(r.complete for r in rows):
            means, worsts = [r.mean for r in rows], [r.worst[0] for r in rows]
            loss = [sum(r.per_task[t]["valid_loss"] for t in TASKS) / len(TASKS) for r in rows]
            cells += [
                f"{sum(means) / len(means):.1%} ({min(means):.0%}-{max(means):.0%})",
                f"{sum(worsts) / len(worsts):.1%} ({min(worsts):.0%}-{max(worsts):.0%})",
                f"{sum(loss) / len(loss):.3f}",
            ]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]
