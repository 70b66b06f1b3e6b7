"""Benchmark of multi-task quality: what each task-weighting strategy does to every task's accuracy.

A controlled study on the synthetic tasks of `mftune.tiny.examples`: four tasks of unequal size (3000 /
1200 / 600 / 250 training records at `--scale 1`) and difficulty, each with a held-out set whose answers
are exact. Every run starts from the same random-weight tiny llama (built once, one seed) and uses the
same optimizer steps, learning-rate schedule, batch and seeds (full fine-tuning):

- `single-task`: one model per task, trained on that task alone (each column of that row is its own model);
- `token`: one model on the mixed data, every token counting the same (big tasks dominate);
- `sample`, `task` (mftune's default), `task_sample`: the other static weightings of the mixed data;
- `coba`: convergence balancing, its step counts scaled to the run length (see below);
- `coba-defaults`: convergence balancing with mftune's default settings.

After each run it reports, per task, the exact-match accuracy of greedy generation on the held-out set
(stripped strings compared) and the final `valid/<task>/loss` of `metrics.jsonl`, then each setup's mean
and worst task, its training wall time (measured around `train()`), and CoBa's time overhead against
`task`. Raw results go to `<workdir>/results.json`, the report to stdout and `<workdir>/results.md`.

    python benchmarks/multitask_quality.py                    # reduced size: 2 CPU cores, under 20 minutes
    python benchmarks/multitask_quality.py --size full        # full size: one GPU
    python benchmarks/multitask_quality.py --strategies task coba --skip-single --steps 100   # a quick look

CoBa's defaults (`warmup` 100, `update_interval` 10, `history` 200 probes) are meant for runs of a few
thousand steps. The `coba` run scales its step counts (`warmup`, `update_interval`) by
`steps / 2000`, the full size's length, keeping `history` in probes, so the full size runs CoBa with
its pure defaults and the reduced size with the same proportions; `coba-defaults` runs the pure
defaults at any size (it is skipped where the two coincide).

Each run trains in a fresh process. On a CPU, `--jobs` runs train side by side, one per core with one
torch thread each (the default there): two threads per process on a core that another process also
uses are many times slower than one. `task` and CoBa at its default settings are started first, so
that with two jobs they run at the same time, under the same load (each run records when it started
and ended, `started`/`ended` in results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml
from multitask_report import SETUPS, TASKS, mean_table, seed_report
from multitask_runs import Run, measure

# CoBa's defaults (mftune.config.CobaConfig) are taken to suit runs of this many steps (the full size).
COBA_REFERENCE_STEPS = 2000


@dataclass(frozen=True)
class Size:
    """One benchmark size: data, model and run length."""

    scale: float
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    steps: int
    heldout: int
    learning_rate: float
    batch: int


SIZES = {
    # Two CPU cores: ten runs, two at a time, each about 3 minutes of training on an otherwise idle machine.
    "reduced": Size(
        scale=1.0,
        hidden_size=128,
        num_layers=4,
        intermediate_size=256,
        num_heads=4,
        steps=500,
        heldout=200,
        learning_rate=3e-3,
        batch=8,
    ),
    # One GPU: a 30M-parameter model on four times the data, CoBa at its defaults.
    "full": Size(
        scale=4.0,
        hidden_size=512,
        num_layers=8,
        intermediate_size=1536,
        num_heads=8,
        steps=COBA_REFERENCE_STEPS,
        heldout=500,
        learning_rate=1e-3,
        batch=8,
    ),
}


# --- setup ----------------------------------------------------------------------------------------


def prepare(workdir: Path, size: Size, seed: int) -> tuple[Path, Path]:
    """Write the task data and held-out sets, and build the base model (once, one seed).

    Returns:
        `(data_root, model_dir)`: tasks under `data_root/data/<task>/`, held-out sets in
        `data_root/heldout/<task>.jsonl`.
    """
    from mftune.tiny import build_tiny_model
    from mftune.tiny.examples import write_examples

    data_root = workdir / "tasks"
    write_examples(data_root, seed=seed, scale=size.scale, num_heldout=size.heldout)
    model_dir = build_tiny_model(
        workdir / "base-model",
        seed=seed,
        hidden_size=size.hidden_size,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        num_kv_heads=size.num_heads // 2,
        intermediate_size=size.intermediate_size,
    )
    return data_root, model_dir


def scaled_coba(steps: int) -> dict:
    """CoBa's step counts scaled from its defaults by `steps / COBA_REFERENCE_STEPS` (history in probes kept)."""
    from mftune.config import CobaConfig

    defaults = CobaConfig()
    factor = min(1.0, steps / COBA_REFERENCE_STEPS)
    return {
        "warmup": max(1, round(defaults.warmup * factor)),
        "update_interval": max(1, round(defaults.update_interval * factor)),
        "history": defaults.history,
    }


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every run, in the order they start: `task`, then CoBa at its default settings (the overhead goal's
    settings), the other mixed runs, single-task runs last."""
    from mftune.config import CobaConfig

    defaults = CobaConfig()
    scaled = scaled_coba(args.steps)
    runs = []
    for name in args.strategies:
        if name == "coba":
            runs.append(Run(name, TASKS, "coba", scaled))
        elif name == "coba-defaults":
            if "coba" in args.strategies and all(getattr(defaults, k) == v for k, v in scaled.items()):
                continue  # the scaled settings are the defaults: the same run twice
            runs.append(Run(name, TASKS, "coba", {}))
        else:
            runs.append(Run(name, TASKS, name))
    first = ("task", "coba-defaults", "coba")
    runs.sort(key=lambda r: (first.index(r.name) if r.name in first else len(first), SETUPS.index(r.name)))
    if not args.skip_single:
        runs += [Run(f"single-{t}", (t,), "task") for t in TASKS]
    return runs


def write_config(
    run: Run, workdir: Path, data_root: Path, model_dir: Path, seed: int, args: argparse.Namespace
) -> Path:
    """The run's mftune config; everything but the tasks, the strategy and CoBa's settings is shared."""
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
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
            "max_steps": args.steps,
            "global_batch_size": args.batch,
            "micro_batch_size": args.batch,
            "learning_rate": args.lr,
            "min_lr": args.lr / 10,
            "lr_schedule": "cosine",
            "warmup_steps": 10,
            # Evaluate before training and at the end only, and save once: every run pays the same.
            "eval_every": args.steps,
            "log_every": max(1, args.steps // 20),
            "save_every": args.steps,
            "keep_last": 1,
            "resume": "never",
            "tensorboard": False,
            "plots": False,
        },
    }
    if run.coba is not None:
        raw["coba"] = run.coba
    path = workdir / "configs" / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def build_cache(configs: list[Path]) -> None:
    """Tokenize every task once, before the runs start (side by side, they would all build it)."""
    from mftune.config import load_config
    from mftune.data.pipeline import load_tokenizer, prepare_data

    done: set[str] = set()
    for path in configs:
        cfg = load_config(path)
        if set(cfg.data.tasks) <= done:
            continue
        prepare_data(cfg, load_tokenizer(cfg.model))
        done |= set(cfg.data.tasks)


def machine(threads: int) -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU: {os.cpu_count()} cores visible ({platform.processor() or platform.machine()}), {threads} torch thread(s) per run"
    return f"{device}; {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}"


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="reduced", help="reduced: CPU; full: a GPU")
    parser.add_argument("--steps", type=int, help="optimizer steps of every run (default: the size's)")
    parser.add_argument(
        "--workdir", type=Path, help="for data, models and results (default: a new temp folder)"
    )
    parser.add_argument(
        "--strategies", nargs="+", choices=SETUPS, default=list(SETUPS), help="mixed-data runs (default: all)"
    )
    parser.add_argument("--skip-single", action="store_true", help="no single-task runs")
    parser.add_argument(
        "--scale", type=float, help="multiplier on every task's train size (default: the size's)"
    )
    parser.add_argument("--heldout", type=int, help="held-out problems per task (default: the size's)")
    parser.add_argument(
        "--lr", type=float, help="peak learning rate, cosine to a tenth (default: the size's)"
    )
    parser.add_argument("--batch", type=int, help="packed rows of 256 tokens per step (default: the size's)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one replication per seed (data, base model, runs) in <workdir>/seed-N, then their mean",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest generated answer")
    parser.add_argument(
        "--jobs", type=int, help="runs trained at once (default: 1 on a GPU, else one per core)"
    )
    parser.add_argument("--threads", type=int, help="torch threads per run on a CPU (default: cores / jobs)")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    args.size_spec = replace(
        size,
        steps=args.steps or size.steps,
        scale=size.scale if args.scale is None else args.scale,
        heldout=args.heldout or size.heldout,
        learning_rate=args.lr or size.learning_rate,
        batch=args.batch or size.batch,
    )
    args.steps, args.lr, args.batch = args.size_spec.steps, args.size_spec.learning_rate, args.size_spec.batch
    cores = os.cpu_count() or 1
    args.jobs = args.jobs or (1 if torch.cuda.is_available() else cores)
    args.threads = args.threads or max(1, cores // args.jobs)
    return args


def run_seed(seed: int, workdir: Path, args: argparse.Namespace) -> list[dict]:
    """Every run of one seed (its own data, base model and runs, under `workdir`), in plan order.

    Runs already in `workdir/results.json` with the same settings are reused, so an interrupted
    benchmark continues where it stopped.
    """
    size: Size = args.size_spec
    workdir.mkdir(parents=True, exist_ok=True)
    data_root, model_dir = prepare(workdir, size, seed)
    settings = {"spec": asdict(size), "seed": seed, "max_new_tokens": args.max_new_tokens}
    runs = plan_runs(args)
    configs = {run.name: write_config(run, workdir, data_root, model_dir, seed, args) for run in runs}
    results: dict[str, dict] = {}
    saved = workdir / "results.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        if {k: old.get(k) for k in settings} == settings:
            wanted = {(run.name, run.strategy, json.dumps(run.coba)) for run in runs}
            results = {
                r["name"]: r
                for r in old["results"]
                if (r["name"], r["strategy"], json.dumps(r["coba"])) in wanted
            }
    if results:
        print(f"seed {seed}: reusing {', '.join(results)} from {saved}", flush=True)
    todo = [run for run in runs if run.name not in results]
    build_cache([configs[run.name] for run in todo])
    meta = {**settings, "size": args.size, "machine": machine(args.threads), "jobs": args.jobs}
    # A fresh process per run: nothing (accelerate's state, seeds, allocator) leaks from one run to the next.
    pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1)
    with pool:
        futures = [
            pool.submit(measure, run, configs[run.name], data_root, args.threads, args.max_new_tokens)
            for run in todo
        ]
        for future in as_completed(futures):
            r = future.result()
            results[r["name"]] = r
            scores = ", ".join(
                f"{t} {v['exact']:.0%} / {v['valid_loss']:.3f}" for t, v in r["per_task"].items()
            )
            print(f"seed {seed} done {r['name']}: {scores}; train {r['train_seconds']:.0f} s", flush=True)
            saved.write_text(json.dumps({**meta, "results": list(results.values())}, indent=1))
    return [results[run.name] for run in runs]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    size: Size = args.size_spec
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mftune-multitask-"))).absolute()
    command = shlex.join(["python", *sys.argv])
    print(f"{command}\nworkdir {workdir}\n{machine(args.threads)}; {args.jobs} run(s) at once", flush=True)

    start = time.perf_counter()
    by_seed = {seed: run_seed(seed, workdir / f"seed-{seed}", args) for seed in args.seeds}
    total = time.perf_counter() - start

    n = min(v["n"] for results in by_seed.values() for r in results for v in r["per_task"].values())
    report = [
        f"command: {command}",
        f"machine: {machine(args.threads)}; {args.jobs} run(s) at once",
        f"size {args.size}: data scale {size.scale}, llama hidden {size.hidden_size} x {size.num_layers} "
        f"layers, full fine-tuning, {size.steps} steps of {size.batch} packed rows of 256 tokens, lr "
        f"{size.learning_rate:g} cosine to {size.learning_rate / 10:g}; exact match (EM) of greedy answers "
        f"on {n} held-out problems per task (one standard error: at most {50 / n**0.5:.1f} points), "
        "loss: final validation loss; train s: wall time of train() (single-task: the four runs together)",
        "",
    ]
    for seed, results in by_seed.items():
        report += seed_report(seed, results)
    if len(by_seed) > 1:
        report += mean_table(by_seed)
    report.append(f"whole benchmark (data, models, training, generation): {total / 60:.1f} min")
    text = "\n".join(report)
    (workdir / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
