"""One run of the multi-task quality benchmark, in its own process: train it (timing CoBa's share), then
score every task's held-out problems by greedy exact match (benchmarks/multitask_quality.py)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Run:
    """One training run: its name, the tasks it trains on, its loss strategy and CoBa settings."""

    name: str
    tasks: tuple[str, ...]
    strategy: str
    coba: dict | None = None


class BalancerClock:
    """Adds up the time spent in `TaskBalancer.after_step` (CoBa's probes and weight updates)."""

    def __init__(self) -> None:
        from mftune.train.task_weights import TaskBalancer

        self.seconds = 0.0
        original = TaskBalancer.after_step

        def timed(balancer, *a, **kw):
            start = time.perf_counter()
            try:
                return original(balancer, *a, **kw)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.seconds += time.perf_counter() - start

        TaskBalancer.after_step = timed


def train_run(config: Path) -> tuple[Path, float, float]:
    """Train in this process.

    Returns:
        `(final_dir, wall_seconds, balancer_seconds)`.
    """
    from mftune.config import load_config
    from mftune.train.loop import train

    cfg = load_config(config)
    clock = BalancerClock()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    final = train(cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return final, time.perf_counter() - start, clock.seconds


def exact_match(final: Path, data_root: Path, tasks: tuple[str, ...], max_new_tokens: int) -> dict:
    """Per task: greedy exact match on its held-out set, and a few wrong answers to look at."""
    from mftune.infer.generate import generate_batch
    from mftune.infer.load import load_for_inference

    model, tokenizer = load_for_inference(final)
    results = {}
    for task in tasks:
        lines = (data_root / "heldout" / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line]
        replies = generate_batch(
            model, tokenizer, [r["messages"] for r in records], max_new_tokens=max_new_tokens, batch_size=32
        )
        hits = [reply.strip() == r["answer"].strip() for reply, r in zip(replies, records, strict=True)]
        misses = [
            {"prompt": r["messages"][-1]["content"], "expected": r["answer"], "got": reply}
            for reply, r, hit in zip(replies, records, hits, strict=True)
            if not hit
        ]
        results[task] = {"exact": sum(hits) / len(hits), "n": len(hits), "misses": misses[:3]}
    return results


def measure(run: Run, config: Path, data_root: Path, threads: int | None, max_new_tokens: int) -> dict:
    """Train one run, then score it: the run's whole result (called in a fresh process)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    final, wall, balancer = train_run(config)
    start = time.perf_counter()
    em = exact_match(final, data_root, run.tasks, max_new_tokens)
    generation = time.perf_counter() - start
    from mftune.train.tracking import read_metrics

    rows = read_metrics(final.parent)
    last_eval = [r for r in rows if "valid/loss" in r][-1]
    speeds = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
    weights = {t: [r[f"coba/{t}/weight"] for r in rows if f"coba/{t}/weight" in r] for t in run.tasks}
    return {
        "name": run.name,
        "strategy": run.strategy,
        "tasks": list(run.tasks),
        "coba": run.coba,
        "steps": last_eval["step"],
        "train_seconds": wall,
        "balancer_seconds": balancer,
        "generation_seconds": generation,
        "started": started,
        "ended": time.time(),
        "tokens_per_second": sum(speeds) / len(speeds) if speeds else None,
        "per_task": {
            t: {
                "exact": em[t]["exact"],
                "n": em[t]["n"],
                "valid_loss": last_eval[f"valid/{t}/loss"],
                "misses": em[t]["misses"],
            }
            for t in run.tasks
        },
        "coba_weights": {t: w for t, w in weights.items() if w} or None,
    }
