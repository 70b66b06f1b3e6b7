"""Every distributed backend end to end through the CLI (`check`), and its speed and memory (`measure`).

`check` (the default) proves that each shipped accelerate config works here. A tiny random-weight Llama
(`mftune.tiny.build_tiny_model`) is fine-tuned on a small generated copy of the example tasks, for each
backend and method, every run a real CLI process with the same config and seed: `mftune train` for `single`,
`mftune launch CONFIG --accelerate NAME --num-processes N` for the others. Each row checks:

- train: the run exits 0 and logs every step's loss; it wrote its step N/2 checkpoint in the backend's
  format (sharded under ZeRO and FSDP, portable otherwise), a `final/` model or adapter, and ran the
  expected number of processes;
- resume: a copy of the run folder as a crash right after the step N/2 checkpoint leaves it (later
  checkpoints and `final/` removed, metrics.jsonl kept whole) is trained again with `train.resume: auto`.
  It must say it resumed from step N/2, leave the lines up to that step untouched, log every later step
  once, and its train and validation losses after the checkpoint must equal the uninterrupted run's;
- merge: LoRA: `mftune merge` of the run, loaded with plain transformers, gives the logits on a fixed input
  that the run gives as `mftune.infer.load.load_for_inference` loads it (base + adapter, unmerged). Full
  fine-tuning has nothing to merge: its `final/` must load as a whole model. Both with no missing,
  unexpected or mismatched weight, and with logits unlike the base model's (something was trained);
- loss: the largest per-step difference of train/loss from `single`'s, within a tolerance that allows for
  bf16 mixed precision on GPUs (the shipped configs use it; `single` trains in float32).

`measure` trains a model shape (Qwen2.5-1.5B's by default, random weights built on the GPU) with full
fine-tuning and LoRA under each backend, one launch per case, and reports tokens/s over the timed steps and
peak GPU memory, from metrics.jsonl (`train/input_tokens`, `train/seconds`, `train/max_memory_gib`). Data,
model and step summaries are those of benchmarks/workload.py.

ZeRO needs DeepSpeed: `pip install deepspeed` (for a machine without internet, build a wheel where there
is a connection, in an environment with torch: `pip wheel deepspeed --no-deps --no-build-isolation`, and
install it there); without it the ZeRO rows are skipped with "deepspeed not installed".

    python benchmarks/backends.py check                                  # every backend, 1 GPU
    python benchmarks/backends.py check --processes 2 --out check-2gpu.json
    python benchmarks/backends.py measure --shape 1.5b --out backends-1.5b.json
    python benchmarks/backends.py check --smoke                          # CPU: single, ddp (2 gloo processes), LoRA
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from backend_checks import Tolerances, check_case, gpu_count, prepare_check, skip_reason, train_command
from benchlib import add_run_flags, in_workdir, log_tail, markdown_table, run_logged, versions, write_json
from workload import (
    GPU_SHAPES,
    SHAPES,
    Profile,
    build_corpus,
    mftune_config,
    mftune_steps,
    model_counts,
    profile_from,
    summarise,
)

BACKENDS = ("single", "ddp", "zero2", "zero2-offload", "zero3", "zero3-offload", "fsdp")
MEASURED_BACKENDS = ("single", "zero2", "zero3", "zero3-offload", "fsdp")
METHODS = ("lora", "full")
PACKAGES = ("mftune", "torch", "transformers", "peft", "accelerate", "deepspeed")


def check_table(rows: list[dict], tol: Tolerances) -> str:
    """The check's results as a markdown table, one row per backend and method."""
    header = [
        "backend",
        "method",
        "train ok",
        "resume equal",
        "merge ok",
        "max \\|loss − single\\|",
        "wall s",
    ]
    cells = []
    for r in rows:
        row = [r["backend"], r["method"]]
        if r["status"] == "skipped":
            row += [f"skipped: {r['reason']}", "-", "-", "-", "-"]
        else:
            row += [_yes_no(r["train_ok"]), _verdict(r.get("resume")), _verdict(r.get("merge"))]
            diff = r.get("loss_diff")
            over = f" (over {tol.loss:g})" if diff is not None and not diff <= tol.loss else ""
            row.append(
                "reference" if r["backend"] == "single" else "-" if diff is None else f"{diff:.2g}{over}"
            )
            row.append(f"{r['wall_s']:.1f}")
        cells.append(row)
    return markdown_table(header, cells, right=(5, 6))


def _yes_no(ok: bool) -> str:
    return "yes" if ok else "NO"


def _verdict(result: dict | None) -> str:
    if result is None:
        return "-"
    diff = result.get("max_diff")
    return _yes_no(result["ok"]) + (f" (Δ {diff:.2g})" if diff is not None else "")


def run_check(args: argparse.Namespace, workdir: Path) -> int:
    """Every (method, backend) row, `single` first; the JSON is rewritten after each row.

    Returns:
        1 if a row that ran failed a check, else 0 (skipped rows do not fail).
    """
    from mftune.train.tracking import read_metrics

    plan = prepare_check(args, workdir)
    report = {
        "mode": "check",
        "command": shlex.join(sys.argv),
        "versions": versions(PACKAGES),
        "gpus": plan.gpus,
        "processes": plan.processes,
        "steps": plan.steps,
        "tolerances": asdict(plan.tol),
        "results": [],
    }
    print(f"command: {report['command']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), flush=True)
    longest = args.row_estimate  # the time a row is expected to need: the longest one so far
    for method in args.methods:
        reference = None
        for backend in args.backends:
            started = time.monotonic()
            if plan.deadline.left() < longest:
                left = max(plan.deadline.left(), 0)
                reason = f"time budget: {left:.0f} s left, ~{longest:.0f} s needed"
                row = {"backend": backend, "method": method, "status": "skipped", "reason": reason}
            else:
                row = check_case(plan, backend, method, reference)
                longest = max(longest, time.monotonic() - started)
            if backend == "single" and row["status"] != "skipped" and row["train_ok"]:
                reference = read_metrics(plan.workdir / "runs" / f"{method}-single")
            report["results"].append(row)
            write_json(args.out, report)
            note = row.get("reason") or "; ".join(row["problems"]) or "all checks passed"
            print(f"  {method} {backend}: {row['status']}: {note}", flush=True)
            if row.get("log_tail"):
                print(row["log_tail"], file=sys.stderr)
    device = next((r["device"] for r in report["results"] if r.get("device")), "none ran")
    report["device"] = device
    write_json(args.out, report)
    print(
        f"\ndevice: {device}; processes per launched backend: {plan.processes}; {plan.steps} steps, "
        f"resumed from step {plan.steps // 2}\n"
    )
    print(check_table(report["results"], plan.tol))
    print(
        f"\ntolerances: loss vs single {plan.tol.loss:g}, resumed vs uninterrupted {plan.tol.resume:g}, "
        f"merged vs unmerged logits {plan.tol.logits:g}. Full fine-tuning: 'merge ok' checks that final/ "
        "loads whole (nothing to merge). wall s: the uninterrupted training run."
    )
    print(f"results: {args.out}")
    return int(any(r["status"] == "FAIL" for r in report["results"]))


# --- measure -------------------------------------------------------------------------------------------


def measure_case(args, profile: Profile, workdir: Path, model_dir: Path, backend: str, method: str) -> dict:
    """One backend and method on the shape: tokens/s over the timed steps, and peak memory."""
    import yaml

    processes = 1 if backend == "single" else args.processes
    row: dict = {"backend": backend, "method": method, "processes": processes}
    if reason := skip_reason(backend, gpu_count(), processes):
        return {**row, "status": "skipped", "error": reason}
    if profile.rows_per_step % processes:
        return {
            **row,
            "status": "skipped",
            "error": f"{profile.rows_per_step} rows per step over {processes}",
        }
    name = f"{method}-{backend}"
    run_dir = workdir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    raw = mftune_config(workdir, model_dir, run_dir, profile, {"finetune": {"method": method}})
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = workdir / "logs" / f"{name}.log"
    argv = train_command(backend, config, [], processes)
    status, wall = run_logged(
        argv, log, timeout=args.deadline.timeout(args.case_timeout), threads=args.threads
    )
    row["wall_s"], row["log"] = round(wall, 1), str(log)
    for written in ("checkpoints", "final"):  # GBs each at 1.5B, and not what is measured
        shutil.rmtree(run_dir / written, ignore_errors=True)
    if status != 0:
        oom = "out of memory" in log_tail(log).lower()
        return {**row, "status": "OOM" if oom else "error", "error": log_tail(log).splitlines()[-1]}
    steps = mftune_steps(run_dir)
    summary = summarise({"status": "ok", "steps": steps}, profile)
    peaks = [s["peak_gib"] for s in steps if s["step"] > profile.warmup_steps and s["peak_gib"] is not None]
    row |= summary
    row["peak_gib"] = max(peaks, default=None)  # rank 0's, since its start: the last timed step's
    if row["status"] == "ok":
        row["tps_per_gpu"] = row["tps"] / processes
    return row


def measure_table(rows: list[dict]) -> str:
    """The measurements as a markdown table, with speed and memory relative to `single` of the same method."""
    single = {r["method"]: r for r in rows if r["backend"] == "single" and r["status"] == "ok"}
    header = ["backend", "method", "processes", "tok/s", "tok/s per GPU", "peak GiB (rank 0)"]
    header += ["tok/s vs single", "memory vs single", "wall s"]
    cells = []
    for r in rows:
        ok, ref = r["status"] == "ok", single.get(r["method"])
        row = [r["backend"], r["method"], str(r["processes"])]
        row.append(f"{r['tps']:,.0f}" if ok else f"{r['status']}: {r.get('error', '')}")
        row.append(f"{r['tps_per_gpu']:,.0f}" if ok else "-")
        row.append(f"{r['peak_gib']:.1f}" if ok and r.get("peak_gib") is not None else "-")
        row.append(f"{r['tps'] / ref['tps']:.2f}" if ok and ref else "-")
        both = ok and ref and r.get("peak_gib") and ref.get("peak_gib")
        row.append(f"{r['peak_gib'] / ref['peak_gib']:.2f}" if both else "-")
        row.append(str(r.get("wall_s", "-")))
        cells.append(row)
    return markdown_table(header, cells, right=range(2, 9))


def run_measure(args: argparse.Namespace, workdir: Path) -> int:
    """Data and model once, then every (method, backend) case; the JSON is rewritten after each case.

    Returns:
        1 if a case failed other than by running out of memory, else 0.
    """
    from throughput import Runner

    if not args.smoke and gpu_count() == 0:
        raise SystemExit("measure needs a CUDA GPU (on a CPU: measure --smoke)")
    if args.shape not in SHAPES:
        raise SystemExit(f"--shape {args.shape!r}: choose from {', '.join(GPU_SHAPES)}")
    # throughput.py's sizes: 3 warm-up + 20 timed steps of 32,768 tokens in rows of 4,096 (smoke: CPU-sized).
    profile = profile_from(args)
    print(f"command: {shlex.join(sys.argv)}")
    corpus = build_corpus(workdir, profile, args.seed)
    built = Runner(workdir, profile, args).model(args.shape, SHAPES[args.shape])
    if built is None:
        raise SystemExit("the time budget ran out while the model was built")
    model_dir, device_name = built
    report = {
        "mode": "measure",
        "command": shlex.join(sys.argv),
        "device": device_name,
        "versions": versions(PACKAGES),
        "shape": args.shape,
        "model": model_counts(SHAPES[args.shape]),
        "profile": asdict(profile),
        "data": corpus,
        "results": [],
    }
    print(f"device: {device_name}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), flush=True)
    for method in args.methods:
        for backend in args.backends:
            row = measure_case(args, profile, workdir, model_dir, backend, method)
            report["results"].append(row)
            write_json(args.out, report)
            done = (
                f"{row['tps']:,.0f} tok/s"
                if row["status"] == "ok"
                else f"{row['status']}: {row.get('error')}"
            )
            print(f"  {method} {backend}: {done} ({row.get('wall_s', 0)} s)", flush=True)
    total = report["model"]["total"]
    size = f"{total / 1e9:.2f}B" if total >= 1e8 else f"{total / 1e6:.2f}M"
    print(
        f"\n{args.shape} ({size} parameters) on {device_name}; "
        f"{profile.rows_per_step} rows of {profile.max_len} tokens per step, "
        f"{profile.warmup_steps} warm-up + {profile.steps} timed steps\n"
    )
    print(measure_table(report["results"]))
    print("\ntok/s: real (non-padding) input tokens per second over the timed steps, all processes together.")
    print(f"results: {args.out}")
    return int(any(r["status"] not in ("ok", "OOM", "skipped") for r in report["results"]))


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("check", "measure"), default="check")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: all (measure: no ddp)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: lora full (smoke: lora)")
    parser.add_argument(
        "--processes", type=int, help="processes of each launched backend (default 1; smoke 2); single: 1"
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="check: steps, resumed from half (default 8; smoke 4); "
        "measure: timed steps (default 20; smoke 2)",
    )
    parser.add_argument("--warmup-steps", type=int, help="measure: untimed steps first (default 3; smoke 1)")
    parser.add_argument(
        "--hidden-size", type=int, help="check: the tiny Llama's width (default 256; smoke 64)"
    )
    parser.add_argument(
        "--dtype", default="float32", help="check: model.dtype of every run (default float32)"
    )
    parser.add_argument(
        "--loss-tol", type=float, help="check: largest |loss − single| (default 1e-4; GPU 5e-2)"
    )
    parser.add_argument(
        "--resume-tol", type=float, help="check: largest |resumed − uninterrupted| (default 0; GPU 2e-3)"
    )
    parser.add_argument("--logits-tol", type=float, default=1e-4, help="check: merged vs unmerged logits")
    parser.add_argument("--shape", default="1.5b", help="measure: a model shape of benchmarks/workload.py")
    parser.add_argument("--seed", type=int, default=0, help="measure: data seed")
    add_run_flags(parser, out="backends-MODE.json")
    parser.add_argument(
        "--row-estimate",
        type=float,
        default=0.0,
        help="check: seconds the first row is expected to take, under --time-budget (default 0)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check of the script: backends single and ddp (2 gloo processes), LoRA, a few steps",
    )
    args = parser.parse_args(argv)
    measure = args.mode == "measure"
    args.backends = args.backends or (
        ["single", "ddp"] if args.smoke else list(MEASURED_BACKENDS if measure else BACKENDS)
    )
    args.backends.sort(key=BACKENDS.index)  # single first: the others are compared with it
    args.methods = args.methods or (["lora"] if args.smoke else list(METHODS))
    args.processes = args.processes or (2 if args.smoke else 1)
    args.threads = args.threads or (1 if args.smoke else None)
    args.out = args.out or Path(f"backends-{args.mode}.json")
    if measure:
        args.shape = "tiny" if args.smoke else args.shape
        for size in ("tokens_per_step", "max_len", "median_len"):  # the throughput sizes (workload.py)
            setattr(args, size, None)
    else:
        args.steps = args.steps or (4 if args.smoke else 8)
        args.hidden_size = args.hidden_size or (64 if args.smoke else 256)
        if args.steps < 2:
            parser.error("--steps must be at least 2 (the run is resumed from half of them)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    in_workdir(args, f"mftune-backends-{args.mode}-", run_measure if args.mode == "measure" else run_check)


if __name__ == "__main__":
    main()
