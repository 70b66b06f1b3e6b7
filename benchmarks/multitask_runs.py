"""One run of the multi-task quality study, in its own process: train it (timing CoBa's share), then score
every task it trained on through `mftune eval` (benchmarks/multitask_quality.py).

Scores are per held-out problem: 1 or 0 for an exact match (the bundled tasks) or a passing program
(`write_code`, pass@1 of the greedy answer in `mftune eval`'s sandbox), read back from `samples.jsonl`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CODE_TASKS = ("write_code",)
MAX_NEW_TOKENS = {"write_code": 128}  # multi-line functions; the others answer in a line


@dataclass(frozen=True)
class Run:
    """One training run.

    Attributes:
        name: Unique within a seed, e.g. `task` or `single-epochs-list_ops`.
        setup: The report row it belongs to (`single-epochs` holds one run per task).
        tasks: The tasks it trains on (and is scored on).
        strategy: `train.loss`.
        steps: Optimizer steps.
        scope: `train.loss_scope`.
        coba: `coba` settings, for CoBa runs.
    """

    name: str
    setup: str
    tasks: tuple[str, ...]
    strategy: str
    steps: int
    scope: str = "step"
    coba: dict | None = None


class BalancerClock:
    """Adds up the time spent in `TaskBalancer.after_step` (CoBa's probes and weight updates) while the
    `with` block runs; the method is restored afterwards, so clocks never stack in a reused process."""

    def __enter__(self) -> BalancerClock:
        from mftune.train.task_weights import TaskBalancer

        self.seconds = 0.0
        self._original = original = TaskBalancer.after_step

        def timed(balancer, *a, **kw):
            start = time.perf_counter()
            try:
                return original(balancer, *a, **kw)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.seconds += time.perf_counter() - start

        TaskBalancer.after_step = timed
        return self

    def __exit__(self, *exc) -> None:
        from mftune.train.task_weights import TaskBalancer

        TaskBalancer.after_step = self._original


def eval_section(
    data_root: Path, tasks: tuple[str, ...], max_new_tokens: int, limit: int | None = None
) -> dict:
    """The `eval` config section that scores `tasks` on their held-out sets."""
    return {
        "loss": False,
        "batch_size": 32,
        "max_new_tokens": max_new_tokens,
        "sandbox": {"workers": 1, "timeout": 10},
        "tasks": {
            t: {
                "path": str(data_root / "heldout" / f"{t}.jsonl"),
                "max_new_tokens": max(max_new_tokens, MAX_NEW_TOKENS.get(t, 0)),
                **({"limit": limit} if limit else {}),
            }
            for t in tasks
        },
    }


def score(model_dir: Path, data_root: Path, tasks: tuple[str, ...], max_new_tokens: int, out: Path) -> dict:
    """Per task: the 0/1 outcome of every held-out problem, in file order, through `mftune eval`."""
    from mftune.config.eval_schema import EvalConfig
    from mftune.eval.run import run_eval
    from mftune.eval.target import resolve_target

    cfg = EvalConfig.model_validate(eval_section(data_root, tasks, max_new_tokens))
    run_eval(resolve_target(model_dir), cfg, None, out)
    outcomes: dict[str, list[float]] = {t: [] for t in tasks}
    for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        outcomes[row["task"]].append(float(row["outcome"] in ("match", "passed")))
    return outcomes


def timed_train(config: Path, threads: int | None) -> dict:
    """Train only (the A/B timing runs): training seconds from metrics.jsonl, and CoBa's share of them."""
    from mftune.train.tracking import read_metrics

    if threads:
        torch.set_num_threads(threads)
    final, wall, balancer = train_run(config)
    seconds = sum(r.get("train/seconds", 0.0) for r in read_metrics(final.parent))
    return {
        "config": config.name,
        "train_seconds": seconds,
        "wall_seconds": wall,
        "balancer_seconds": balancer,
    }


def train_run(config: Path) -> tuple[Path, float, float]:
    """Train in this process. Returns `(final_dir, wall_seconds, balancer_seconds)`."""
    from mftune.config import load_config
    from mftune.train.loop import train

    cfg = load_config(config)
    with BalancerClock() as clock:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        final = train(cfg)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return final, time.perf_counter() - start, clock.seconds


def curves(run_dir: Path, tasks: tuple[str, ...]) -> dict:
    """Per-task curves from metrics.jsonl: validation loss, CoBa weights, in-training eval scores."""
    from mftune.train.tracking import read_metrics

    rows = read_metrics(run_dir)

    def series(key: str) -> list[list[float]]:
        return [[r["step"], r[key]] for r in rows if key in r]

    out: dict = {"valid_loss": {}, "weight": {}, "score": {}}
    for t in tasks:
        out["valid_loss"][t] = series(f"valid/{t}/loss")
        out["weight"][t] = series(f"coba/{t}/weight")
        metric = "pass@1" if t in CODE_TASKS else "exact_match"
        out["score"][t] = series(f"eval/{t}/{metric}")
    return out


def measure(run: Run, config: Path, data_root: Path, threads: int | None, max_new_tokens: int) -> dict:
    """Train one run, then score it: the run's whole result (called in a fresh process)."""
    from mftune.train.tracking import read_metrics

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    final, wall, balancer = train_run(config)
    start = time.perf_counter()
    outcomes = score(final, data_root, run.tasks, max_new_tokens, final.parent / "heldout-eval")
    scoring = time.perf_counter() - start
    rows = read_metrics(final.parent)
    last_eval = [r for r in rows if "valid/loss" in r][-1]
    return {
        "name": run.name,
        "setup": run.setup,
        "strategy": run.strategy,
        "scope": run.scope,
        "tasks": list(run.tasks),
        "coba": run.coba,
        "steps": last_eval["step"],
        "wall_seconds": wall,
        "train_seconds": sum(r.get("train/seconds", 0.0) for r in rows),  # training only: no evaluation
        "balancer_seconds": balancer,
        "scoring_seconds": scoring,
        "started": started,
        "ended": time.time(),
        "valid_loss": {t: last_eval[f"valid/{t}/loss"] for t in run.tasks},
        "outcomes": outcomes,
        "curves": curves(final.parent, run.tasks),
    }
