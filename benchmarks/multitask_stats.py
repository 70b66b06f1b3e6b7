"""Statistics of the multi-task quality study: means over seeds with bootstrap intervals, and paired
differences between setups (benchmarks/multitask_quality.py).

Every setup of a seed answers the same held-out problems, so its outcomes are 0/1 arrays in the same
problem order. A score is a task's mean outcome; a setup's value is the mean over seeds of its per-seed
score. The bootstrap redraws the seeds, and within each drawn seed its problems, both with replacement;
the same draws serve every setup, so differences between setups are paired. Summaries per setup: each
task, the mean task (the mean over tasks of a seed's scores) and the worst task (their minimum).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# outcomes[setup][seed][task]: 0/1 per held-out problem
Outcomes = Mapping[str, Mapping[int, Mapping[str, list[float]]]]


def point_estimates(outcomes: Outcomes, tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per setup: each task's score, `mean` and `worst`, averaged over the seeds."""
    result = {}
    for setup, by_seed in outcomes.items():
        per_seed = np.array([[np.mean(by_seed[seed][t]) for t in tasks] for seed in sorted(by_seed)])
        result[setup] = {
            **{t: float(per_seed[:, i].mean()) for i, t in enumerate(tasks)},
            "mean": float(per_seed.mean(axis=1).mean()),
            "worst": float(per_seed.min(axis=1).mean()),
        }
    return result


def bootstrap(
    outcomes: Outcomes, tasks: tuple[str, ...], *, draws: int = 2000, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap replicates, per setup and summary (each task, `mean`, `worst`): arrays of `draws` values.

    Draw b picks S seeds with replacement, then for each picked seed and task n problem indices with
    replacement (n: that task's problems), and every setup is scored on those same problems.
    """
    setups = list(outcomes)
    seeds = sorted(next(iter(outcomes.values())))
    rng = np.random.default_rng(seed)
    arrays = {
        s: {k: {t: np.asarray(outcomes[s][k][t], dtype=float) for t in tasks} for k in seeds} for s in setups
    }
    reps = {s: {key: np.empty(draws) for key in (*tasks, "mean", "worst")} for s in setups}
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
            reps[s]["worst"][b] = scores[s].min(axis=1).mean()
    return reps


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def summarise(outcomes: Outcomes, tasks: tuple[str, ...], baselines: tuple[str, ...], *, draws: int = 2000,
              seed: int = 0) -> dict:  # fmt: skip
    """Point estimates with 95% intervals per setup, and paired differences against each baseline.

    Returns:
        `{"setups": {setup: {key: {"value", "low", "high"}}}, "differences": {baseline: {setup: {key:
        {"value", "low", "high", "wins"}}}}, "draws", "seed"}`; `wins` counts the seeds where the setup is
        above the baseline (of the seeds both have).
    """
    points = point_estimates(outcomes, tasks)
    reps = bootstrap(outcomes, tasks, draws=draws, seed=seed)
    keys = (*tasks, "mean", "worst")
    setups = {
        s: {
            k: {"value": points[s][k], **dict(zip(("low", "high"), interval(reps[s][k]), strict=True))}
            for k in keys
        }
        for s in outcomes
    }
    differences: dict = {}
    for base in baselines:
        if base not in outcomes:
            continue
        differences[base] = {}
        for s in outcomes:
            if s == base:
                continue
            differences[base][s] = {
                k: {
                    "value": points[s][k] - points[base][k],
                    **dict(zip(("low", "high"), interval(reps[s][k] - reps[base][k]), strict=True)),
                    "wins": _wins(outcomes[s], outcomes[base], tasks, k),
                }
                for k in keys
            }
    return {"setups": setups, "differences": differences, "draws": draws, "seed": seed}


def seed_value(by_task: Mapping[str, list[float]], tasks: tuple[str, ...], key: str) -> float:
    """One seed's score of a task, or its `mean` or `worst` task."""
    scores = [float(np.mean(by_task[t])) for t in tasks]
    if key == "mean":
        return float(np.mean(scores))
    if key == "worst":
        return min(scores)
    return float(np.mean(by_task[key]))


def _wins(a: Mapping, b: Mapping, tasks: tuple[str, ...], key: str) -> str:
    seeds = sorted(set(a) & set(b))
    pairs = [(seed_value(a[k], tasks, key), seed_value(b[k], tasks, key)) for k in seeds]
    above = sum(x > y for x, y in pairs)
    ties = sum(x == y for x, y in pairs)
    return f"{above}/{len(seeds)}" + (f" ({ties} tied)" if ties else "")
