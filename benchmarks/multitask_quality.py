"""Benchmark of multi-task quality: what each task-weighting strategy does to every task, from a
pretrained base, against equal-compute baselines, over several seeds with intervals.

One command runs the whole study (docs/multitask-quality.md says what it found):

1. pre-trains the tiny Llama-shaped base on a generated corpus (`multitask_pretrain`), once, cached;
2. per seed, writes the five tasks (`multitask_data`: four with exact answers, `write_code` scored by
   running tests) and trains, from that base, with the same steps, schedule and batch (8 packed rows
   as 2 micro-batches of 4):
   - `token` (plain mixed fine-tuning: every token counts the same, as TRL's SFTTrainer does),
   - `mftcoder-task` (MFTCoder's default case3, normalised per micro-batch: `train.loss_scope:
     micro_batch`), and mftune's `sample`, `task`, `task_sample`,
   - `coba` (its step counts scaled to the run length) and `coba-defaults`,
   - `single-epochs` (one model per task for the multi-task run's epochs: steps in proportion to its
     data) and `single-steps` (one model per task, the multi-task run's steps split equally);
   every single-task row spends the multi-task run's steps in all;
3. scores every run and the base itself (`zero-shot`) on each task's held-out problems through
   `mftune eval`: exact match of greedy answers, pass@1 of `write_code`;
4. reports per setup each task, the mean task and the worst task (mean over seeds, 95% bootstrap
   intervals over seeds and problems), paired differences against `token` and `mftcoder-task`, CoBa's
   time (measured inside CoBa, and an interleaved A/B of `task` and `coba-defaults`), writes
   `results.json` and `results.md`, and plots each setup's curves to `plots/<setup>.png`.

    python benchmarks/multitask_quality.py --workdir runs/mq              # reduced: 2 CPU cores
    python benchmarks/multitask_quality.py --size full --workdir runs/mqf  # one GPU
    python benchmarks/multitask_quality.py --size smoke                    # CI: the structure, in a minute

Runs already in a seed's `results.json` with the same settings are reused, so an interrupted study
continues where it stopped. On a CPU, `--jobs` runs train side by side, one per core with one torch
thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml
from multitask_data import TASKS, write_tasks
from multitask_pretrain import PretrainSpec, pretrained_base
from multitask_report import write_report
from multitask_runs import Run, eval_section, measure, score, timed_train
from multitask_stats import summarise

MIXED = ("token", "mftcoder-task", "sample", "task", "task_sample", "coba", "coba-defaults")
SINGLES = ("single-epochs", "single-steps")
BASELINES = ("token", "mftcoder-task")
COBA_REFERENCE_STEPS = 2000  # CoBa's defaults are taken to suit runs of this many steps (the full size)


@dataclass(frozen=True)
class Size:
    """One study size."""

    pretrain: PretrainSpec
    scale: float
    heldout: int
    steps: int
    batch: int
    accumulation: int
    learning_rate: float
    seeds: tuple[int, ...]
    max_new_tokens: int
    curve_points: int  # in-training evaluations of a mixed run (on curve_problems per task)
    curve_problems: int
    ab_steps: int  # the interleaved A/B timing of task and coba-defaults: steps per run
    ab_order: str = "ABBABAAB"
    bootstrap: int = 2000
    reuse_workers: bool = False  # smoke: one process per job for all its runs (faster, less isolated)
    notes: dict = field(default_factory=dict, compare=False)


SIZES = {
    "smoke": Size(
        pretrain=PretrainSpec(32, 2, 2, 64, corpus_records=64, steps=6, batch=4, learning_rate=3e-3, heldout=4),
        scale=0.02, heldout=4, steps=4, batch=4, accumulation=2, learning_rate=1e-3, seeds=(0, 1),
        max_new_tokens=8, curve_points=1, curve_problems=2, ab_steps=2, ab_order="AB", bootstrap=200,
        reuse_workers=True,
    ),
    "reduced": Size(
        pretrain=PretrainSpec(128, 4, 4, 256, corpus_records=24000, steps=1500, batch=8, learning_rate=3e-3,
                              heldout=200),
        scale=1.0, heldout=200, steps=400, batch=8, accumulation=2, learning_rate=1e-3, seeds=(0, 1, 2, 3, 4),
        max_new_tokens=48, curve_points=4, curve_problems=40, ab_steps=150,
    ),
    "full": Size(
        pretrain=PretrainSpec(512, 8, 8, 1536, corpus_records=200000, steps=8000, batch=16, learning_rate=1e-3,
                              heldout=500),
        scale=4.0, heldout=500, steps=2000, batch=16, accumulation=2, learning_rate=5e-4, seeds=(0, 1, 2, 3, 4),
        max_new_tokens=64, curve_points=8, curve_problems=100, ab_steps=500,
    ),
}  # fmt: skip


def scaled_coba(steps: int) -> dict:
    """CoBa's step counts scaled from its defaults by `steps / COBA_REFERENCE_STEPS` (history kept)."""
    from mftune.config import CobaConfig

    defaults = CobaConfig()
    factor = min(1.0, steps / COBA_REFERENCE_STEPS)
    return {
        "warmup": max(1, round(defaults.warmup * factor)),
        "update_interval": max(1, round(defaults.update_interval * factor)),
        "history": defaults.history,
    }


def plan_runs(size: Size, sizes: dict[str, int], setups: tuple[str, ...]) -> list[Run]:
    """Every run of a seed, `task` and `coba-defaults` first (side by side under two jobs, their times
    compare), single-task runs last. `sizes`: train records per task."""
    runs = []
    for name in setups:
        if name == "coba":
            runs.append(Run(name, name, TASKS, "coba", size.steps, coba=scaled_coba(size.steps)))
        elif name == "coba-defaults":
            runs.append(Run(name, name, TASKS, "coba", size.steps, coba={}))
        elif name == "mftcoder-task":
            runs.append(Run(name, name, TASKS, "task", size.steps, scope="micro_batch"))
        elif name in MIXED:
            runs.append(Run(name, name, TASKS, name, size.steps))
    first = ("task", "coba-defaults")
    runs.sort(key=lambda r: first.index(r.name) if r.name in first else len(first))
    total = sum(sizes.values())
    for task in TASKS:
        if "single-epochs" in setups:
            steps = max(1, round(size.steps * sizes[task] / total))
            runs.append(Run(f"single-epochs-{task}", "single-epochs", (task,), "task", steps))
        if "single-steps" in setups:
            runs.append(
                Run(f"single-steps-{task}", "single-steps", (task,), "task", max(1, size.steps // len(TASKS)))
            )
    return runs


def write_config(run: Run, workdir: Path, data_root: Path, base: Path, seed: int, size: Size,
                 curves: bool = True) -> Path:  # fmt: skip
    """The run's mftune config; everything but the tasks, steps, strategy, scope and CoBa is shared."""
    raw = {
        "model": {"name_or_path": str(base), "dtype": "float32"},
        "finetune": {"method": "full"},
        "data": {
            "tasks": {t: {"path": str(data_root / "data" / t)} for t in run.tasks},
            "template": {"kind": "role_markers"},
            "max_seq_len": 256,
            "packing": "isolated",
            "valid_ratio": 0.05,
            "sampling": "proportional",
            "seed": seed,
            "cache_dir": str(workdir / "cache"),
            "num_proc": 1,
        },
        "train": {
            "output_dir": str(workdir / "runs" / run.name),
            "seed": seed,
            "loss": run.strategy,
            "loss_scope": run.scope,
            "max_steps": run.steps,
            "global_batch_size": size.batch,
            "micro_batch_size": size.batch // size.accumulation,
            "learning_rate": size.learning_rate,
            "min_lr": size.learning_rate / 10,
            "lr_schedule": "cosine",
            "warmup_steps": min(10, max(1, run.steps // 10)),
            "eval_every": max(1, run.steps // max(1, size.curve_points)),
            "log_every": max(1, run.steps // 20),
            "save_every": run.steps,
            "keep_last": 1,
            "resume": "never",
            "tensorboard": False,
            "plots": False,
        },
    }
    if run.coba is not None:
        raw["coba"] = run.coba
    if curves and len(run.tasks) > 1 and size.curve_points:
        # Eval scores during training, on a subset of the held-out problems, for the curves.
        raw["train"]["eval_generate_every"] = max(1, run.steps // size.curve_points)
        raw["eval"] = eval_section(data_root, run.tasks, size.max_new_tokens, limit=size.curve_problems)
    path = workdir / "configs" / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def machine(threads: int) -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {threads} torch thread(s) per run"
    return f"{device}; {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}"


def _pool(args) -> ProcessPoolExecutor:
    # A fresh process per run: nothing (accelerate's state, seeds, allocator) leaks from one to the next.
    per_child = None if args.size_spec.reuse_workers else 1
    return ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=per_child)


def run_seed(seed: int, workdir: Path, base: Path, args) -> dict:
    """Every run of one seed, and the base's zero-shot scores; reuses what `results.json` already holds."""
    size: Size = args.size_spec
    workdir.mkdir(parents=True, exist_ok=True)
    data_root = workdir / "tasks"
    sizes = write_tasks(data_root, seed, size.scale, size.heldout)
    runs = plan_runs(size, sizes, args.setups)
    configs = {r.name: write_config(r, workdir, data_root, base, seed, size) for r in runs}
    # As JSON reads it back (tuples become lists), so that saved settings compare equal.
    settings = json.loads(json.dumps({"size": asdict(size), "seed": seed, "base": str(base)}))
    saved_path = workdir / "results.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    results = {r["name"]: r for r in saved.get("runs", [])} if saved.get("settings") == settings else {}
    zero = saved.get("zero_shot") if saved.get("settings") == settings else None
    todo = [r for r in runs if r.name not in results]
    if results:
        print(f"seed {seed}: reusing {len(results)} run(s) from {saved_path}", flush=True)
    for run in todo:  # a run interrupted before it was recorded starts again from nothing
        shutil.rmtree(workdir / "runs" / run.name, ignore_errors=True)
    _build_cache([configs[r.name] for r in todo])

    def save() -> None:
        saved_path.write_text(json.dumps({"settings": settings, "sizes": sizes, "zero_shot": zero,
                                          "runs": list(results.values())}, indent=1))  # fmt: skip

    with _pool(args) as pool:
        futures = {}
        if zero is None:
            futures[
                pool.submit(score, base, data_root, TASKS, size.max_new_tokens, workdir / "zero-shot")
            ] = None
        for run in todo:
            futures[
                pool.submit(measure, run, configs[run.name], data_root, args.threads, size.max_new_tokens)
            ] = run
        for future in as_completed(futures):
            if future.exception() is not None:  # stop at once: the queued runs would only be lost
                pool.shutdown(wait=False, cancel_futures=True)
            if futures[future] is None:
                zero = future.result()
                print(f"seed {seed} zero-shot: {_brief(zero)}", flush=True)
            else:
                r = future.result()
                results[r["name"]] = r
                print(
                    f"seed {seed} {r['name']}: {_brief(r['outcomes'])}; train {r['train_seconds']:.0f} s",
                    flush=True,
                )
            save()
    return {"sizes": sizes, "zero_shot": zero, "runs": [results[r.name] for r in runs]}


def _brief(outcomes: dict) -> str:
    return ", ".join(f"{t} {sum(v) / len(v):.0%}" for t, v in outcomes.items())


def _build_cache(configs: list[Path]) -> None:
    """Tokenize every task once, before runs start side by side (each would build it)."""
    from mftune.config import load_config
    from mftune.data.pipeline import load_tokenizer, prepare_data

    done: set[str] = set()
    for path in configs:
        cfg = load_config(path)
        if set(cfg.data.tasks) <= done:
            continue
        prepare_data(cfg, load_tokenizer(cfg.model))
        done |= set(cfg.data.tasks)


def ab_timing(workdir: Path, base: Path, args) -> list[dict]:
    """`task` and `coba-defaults` on seed 0's data, one at a time, interleaved in `ab_order`."""
    size: Size = args.size_spec
    data_root = workdir / "seed-0" / "tasks"
    if not data_root.is_dir() or not size.ab_steps:
        return []
    runs = {"A": Run("ab-task", "ab", TASKS, "task", size.ab_steps),
            "B": Run("ab-coba-defaults", "ab", TASKS, "coba", size.ab_steps, coba={})}  # fmt: skip
    results = []
    for i, letter in enumerate(size.ab_order):
        run = replace(runs[letter], name=f"{runs[letter].name}-{i}")
        config = write_config(run, workdir / "ab", data_root, base, 0, size, curves=False)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(timed_train, config, args.threads).result()
        results.append({"order": i, "setup": "task" if letter == "A" else "coba-defaults", **result})
        print(f"A/B {i} {results[-1]['setup']}: {result['train_seconds']:.1f} s", flush=True)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="reduced")
    parser.add_argument(
        "--workdir", type=Path, help="data, models, runs and results (default: a temp folder)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the size's")
    parser.add_argument("--setups", nargs="+", choices=(*MIXED, *SINGLES), default=[*MIXED, *SINGLES])
    parser.add_argument("--jobs", type=int, help="runs at once (default: 1 on a GPU, else one per core)")
    parser.add_argument("--threads", type=int, help="torch threads per run on a CPU (default: cores / jobs)")
    parser.add_argument("--no-ab", action="store_true", help="skip the interleaved A/B timing")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="recompute the statistics and the report from WORKDIR/results.json",
    )
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    args.size_spec = replace(size, seeds=tuple(args.seeds or size.seeds))
    args.setups = tuple(args.setups)
    cores = os.cpu_count() or 1
    args.jobs = args.jobs or (
        1 if torch.cuda.is_available() else min(cores, 2 if args.size == "smoke" else cores)
    )
    args.threads = args.threads or max(1, cores // args.jobs)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size: Size = args.size_spec
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mftune-multitask-"))).absolute()
    if args.report_only:
        results = json.loads((workdir / "results.json").read_text())
        results["summary"] = summarise(
            results["outcomes"], TASKS, BASELINES, draws=results["spec"]["bootstrap"]
        )
        (workdir / "results.json").write_text(json.dumps(results, indent=1))
        print(write_report(results, workdir))
        return 0
    command = shlex.join(
        ["python", *(sys.argv if argv is None else ["benchmarks/multitask_quality.py", *argv])]
    )
    print(f"{command}\nworkdir {workdir}\n{machine(args.threads)}; {args.jobs} run(s) at once", flush=True)
    start = time.perf_counter()
    base, built = pretrained_base(workdir, size.pretrain, threads=os.cpu_count())
    pretrain_minutes = (time.perf_counter() - start) / 60
    print(
        f"base: {base} ({'pre-trained now' if built else 'from the cache'}, {pretrain_minutes:.1f} min)",
        flush=True,
    )
    by_seed = {seed: run_seed(seed, workdir / f"seed-{seed}", base, args) for seed in size.seeds}
    ab = [] if args.no_ab else ab_timing(workdir, base, args)
    outcomes = _outcomes(by_seed)
    summary = summarise(outcomes, TASKS, BASELINES, draws=size.bootstrap)
    results = {
        "command": command,
        "machine": f"{machine(args.threads)}; {args.jobs} run(s) at once",
        "size": args.size,
        "spec": asdict(size),
        "seeds": list(size.seeds),
        "pretrain": {"base": str(base), "built_now": built, "minutes": pretrain_minutes},
        "by_seed": {str(k): v for k, v in by_seed.items()},
        "outcomes": outcomes,
        "summary": summary,
        "ab": ab,
        "minutes": (time.perf_counter() - start) / 60,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    text = write_report(results, workdir)
    print("\n" + text)
    return 0


def _outcomes(by_seed: dict[int, dict]) -> dict:
    """outcomes[setup][seed][task]: the per-problem 0/1 of every setup (single-task rows: one run per task)."""
    out: dict = {"zero-shot": {}}
    for seed, result in by_seed.items():
        out["zero-shot"][seed] = result["zero_shot"]
        for run in result["runs"]:
            out.setdefault(run["setup"], {}).setdefault(seed, {}).update(run["outcomes"])
    return out


if __name__ == "__main__":
    sys.exit(main())
