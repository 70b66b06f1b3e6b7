"""Statistics of the multi-task quality study: means over seeds with bootstrap intervals, and paired
differences between setups (benchmarks/multitask_quality.py).

Every setup of a seed answers the same held-out problems, so its outcomes are 0/1 arrays in the same
problem order. A score is a task's mean outcome; a setup's value is the mean over seeds of its per-seed
score. The bootstrap redraws the seeds, and within each drawn seed its problems, both with replacement;
the same draws serve every setup, so differences between setups are paired. Summaries per setup: each
task, the mean task (the mean over tasks), and the worst task: the task with the setup's lowest score,
chosen once from the point estimates. (Re-choosing it in every draw would take the minimum of noisier
scores, which biases its interval below the estimate.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# outcomes[setup][seed][task]: 0/1 per held-out problem
Outcomes = Mapping[str, Mapping[int, Mapping[str, list[float]]]]


def point_estimates(outcomes: Outcomes, tasks: tuple[str, ...]) -> dict[str, dict]:
    """Per setup: each task's score, `mean`, `worst` and `worst_task`, averaged over the seeds."""
    result = {}
    for setup, by_seed in outcomes.items():
        per_seed = np.array([[np.mean(by_seed[seed][t]) for t in tasks] for seed in sorted(by_seed)])
        scores = {t: float(per_seed[:, i].mean()) for i, t in enumerate(tasks)}
        worst = min(tasks, key=lambda t: scores[t])
        result[setup] = {
            **scores,
            "mean": float(per_seed.mean(axis=1).mean()),
            "worst": scores[worst],
            "worst_task": worst,
        }
    return result


def bootstrap(
    outcomes: Outcomes, tasks: tuple[str, ...], *, draws: int = 2000, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap replicates per setup, of each task's score and of the `mean` task: `draws` values each.

    Draw b picks S seeds with replacement, then for each picked seed and task n problem indices with
    replacement (n: that task's problems), and every setup is scored on those same problems.
    """
    setups = list(outcomes)
    seeds = sorted(next(iter(outcomes.values())))
    rng = np.random.default_rng(seed)
    arrays = {
        s: {k: {t: np.asarray(outcomes[s][k][t], dtype=float) for t in tasks} for k in seeds} for s in setups
    }
    reps = {s: {key: np.empty(draws) for key in (*tasks, "mean")} for s in setups}
    for b in range(draws):
        picked = rng.integers(0, len(seeds), len(seeds))
        scores = {s: np.empty((len(seeds), len(tasks))) for s in setups}
        for row, k in enumerate(picked):
            for col, t in enumerate(tasks):
                n = len(arrays[setups[0]][seeds[k]][t])
                index = rng.integers(0, n, n)
                for s in setups:
                    scores[s][row, col] = arrays[s][seeds[k]][t][index].mean()
        for s in setups:
            for col, t in enumerate(tasks):
                reps[s][t][b] = scores[s][:, col].mean()
            reps[s]["mean"][b] = scores[s].mean(axis=1).mean()
    return reps


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _entry(value: float, replicates: np.ndarray) -> dict:
    low, high = interval(replicates)
    return {"value": value, "low": low, "high": high}


def summarise(
    outcomes: Outcomes,
    tasks: tuple[str, ...],
    baselines: tuple[str, ...],
    *,
    draws: int = 2000,
    seed: int = 0,
) -> dict:
    """Point estimates with 95% intervals per setup, and paired differences against each baseline.

    Returns:
        `{"setups": {setup: {key: {"value", "low", "high"}, "worst_task"}}, "differences": {baseline:
        {setup: {key: {"value", "low", "high", "wins"}}}}, "draws", "seed"}` for the keys: each task,
        `mean` and `worst` (each setup's own worst task); `wins` counts the seeds where the setup is
        above the baseline.
    """
    points = point_estimates(outcomes, tasks)
    reps = bootstrap(outcomes, tasks, draws=draws, seed=seed)
    for s in outcomes:
        reps[s]["worst"] = reps[s][points[s]["worst_task"]]
    keys = (*tasks, "mean", "worst")
    setups = {
        s: {**{k: _entry(points[s][k], reps[s][k]) for k in keys}, "worst_task": points[s]["worst_task"]}
        for s in outcomes
    }
    differences: dict = {}
    for base in (b for b in baselines if b in outcomes):
        differences[base] = {}
        for s in (s for s in outcomes if s != base):
            worst = (points[s]["worst_task"], points[base]["worst_task"])
            differences[base][s] = {
                k: {
                    **_entry(points[s][k] - points[base][k], reps[s][k] - reps[base][k]),
                    "wins": _wins(outcomes[s], outcomes[base], tasks, k, worst),
                }
                for k in keys
            }
    return {"setups": setups, "differences": differences, "draws": draws, "seed": seed}


def seed_value(
    by_task: Mapping[str, list[float]], tasks: tuple[str, ...], key: str, worst_task: str
) -> float:
    """One seed's score of a task, of its `mean` task, or of the setup's `worst` task."""
    if key == "mean":
        return float(np.mean([np.mean(by_task[t]) for t in tasks]))
    return float(np.mean(by_task[worst_task if key == "worst" else key]))


def _wins(a: Mapping, b: Mapping, tasks: tuple[str, ...], key: str, worst: tuple[str, str]) -> str:
    seeds = sorted(set(a) & set(b))
    pairs = [(seed_value(a[k], tasks, key, worst[0]), seed_value(b[k], tasks, key, worst[1])) for k in seeds]
    above = sum(x > y for x, y in pairs)
    ties = sum(x == y for x, y in pairs)
    return f"{above}/{len(seeds)}" + (f" ({ties} tied)" if ties else "")
