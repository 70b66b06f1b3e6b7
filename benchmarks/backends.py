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
model and step summaries are those of benchmarks/throughput.py.

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
import contextlib
import io
import json
import math
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import util
from pathlib import Path

BACKENDS = ("single", "ddp", "zero2", "zero2-offload", "zero3", "zero3-offload", "fsdp")
MEASURED_BACKENDS = ("single", "zero2", "zero3", "zero3-offload", "fsdp")
METHODS = ("lora", "full")
TASKS = ("arithmetic", "list_ops", "write_function", "write_test")
DATA_SCALE = 0.1  # of the example tasks' sizes: 505 records in all
ROWS_PER_PROCESS = 4  # the check's global batch per process, micro-batch 1: 4 micro-batches per step
PROBE_TEXT = (
    "<|im_start|>user\nWrite a function `f(x)` that returns x plus 3.<|im_end|>\n<|im_start|>assistant\n"
)
LOG_TAIL = 15


@dataclass(frozen=True)
class Tolerances:
    """Largest absolute differences a check accepts.

    Attributes:
        loss: per-step train/loss of a backend against `single`'s.
        resume: per-step losses of the resumed run against the uninterrupted run's.
        logits: merged model against base + adapter (both float32 on the CPU).
    """

    loss: float
    resume: float
    logits: float


def default_tolerances(cuda: bool) -> Tolerances:
    """Exact or near it on CPUs (everything float32); on GPUs, room for bf16 and nondeterministic kernels.

    On GPUs the launched backends compute in bf16 (the shipped configs' mixed precision) while `single`
    computes in float32: 0.05 on a loss near 8 (ln 4096) leaves room for bf16 rounding, and the check
    prints the number, to be read against how much the loss falls per step. Some CUDA kernels (attention
    backward) are not deterministic, so two identical runs may differ slightly after the first step.
    """
    if cuda:
        return Tolerances(loss=5e-2, resume=2e-3, logits=1e-4)
    return Tolerances(loss=1e-4, resume=0.0, logits=1e-4)


# --- comparisons (pure: metrics.jsonl rows in, verdicts out) -----------------------------------------


def by_step(rows: list[dict], key: str, *, after: int = 0) -> dict[int, float]:
    """`{step: value}` of the metrics rows holding `key`, for steps past `after`."""
    return {r["step"]: r[key] for r in rows if key in r and r["step"] > after}


def largest(diffs: list[float]) -> float | None:
    """The largest difference, NaN if any is (`max` would skip it), None if there is none."""
    return math.nan if any(math.isnan(d) for d in diffs) else max(diffs, default=None)


def compare_resumed(straight: list[dict], resumed: list[dict], checkpoint_step: int, tol: float) -> dict:
    """Whether a run resumed from `checkpoint_step` continued exactly as the uninterrupted run went on.

    Args:
        straight: metrics.jsonl rows of the uninterrupted run.
        resumed: metrics.jsonl rows of the resumed run, whose folder held the straight run's rows when it
            started (a crash leaves them all, also those logged after the checkpoint).
        checkpoint_step: the step of the checkpoint it resumed from.
        tol: largest absolute difference accepted between losses of the same step.

    Returns:
        `ok`, `max_diff` (over train/loss and valid/loss after the checkpoint; None if none compared) and
        `problems` (what is wrong, in words).
    """
    problems = []
    expected = [r["step"] for r in straight if "train/loss" in r]
    logged = [r["step"] for r in resumed if "train/loss" in r]
    if logged != expected:
        problems.append(f"logged train steps {logged}, expected {expected}")
    kept = [r for r in straight if r["step"] <= checkpoint_step]
    if [r for r in resumed if r["step"] <= checkpoint_step] != kept:
        # A run that started over rewrites these lines (their timings at least differ).
        problems.append(f"the lines up to step {checkpoint_step} were rewritten: the run did not continue")
    diffs = []
    for key in ("train/loss", "valid/loss"):
        a, b = by_step(straight, key, after=checkpoint_step), by_step(resumed, key, after=checkpoint_step)
        if a.keys() != b.keys():
            problems.append(f"{key} logged at steps {sorted(b)}, expected {sorted(a)}")
        diffs += [abs(a[s] - b[s]) for s in a.keys() & b.keys()]
    max_diff = largest(diffs)
    if max_diff is None:
        problems.append(f"no loss logged after step {checkpoint_step}")
    elif not max_diff <= tol:  # NaN fails too
        problems.append(
            f"losses after step {checkpoint_step} differ by up to {max_diff:.3g} (tolerance {tol:g})"
        )
    return {"ok": not problems, "max_diff": max_diff, "problems": problems}


def loss_difference(rows: list[dict], reference: list[dict]) -> float:
    """Largest |train/loss − the reference's| over the steps; inf if they logged different steps."""
    a, b = by_step(rows, "train/loss"), by_step(reference, "train/loss")
    if a.keys() != b.keys() or not a:
        return math.inf
    return largest([abs(a[s] - b[s]) for s in a])


# --- running the CLI -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(backend: str, config: Path, overrides: list[str], processes: int) -> list[str]:
    """The CLI run of one backend: `mftune train` in this process's interpreter, or `mftune launch`."""
    mftune = [sys.executable, "-m", "mftune.cli"]
    if backend == "single":
        return [*mftune, "train", str(config), *overrides]
    launch = ["--accelerate", backend, "--num-processes", str(processes)]
    launch += ["--main-process-port", str(free_port())]  # a fresh port: the previous run's may linger
    return [*mftune, "launch", str(config), *launch, *overrides]


def skip_reason(backend: str, gpus: int, processes: int) -> str | None:
    """Why `backend` cannot run here, or None."""
    from mftune.train.launch import LaunchError, check_runnable, named_config

    if backend == "single":
        return None
    if backend.startswith("zero") and util.find_spec("deepspeed") is None:
        return "deepspeed not installed (pip install deepspeed)"
    try:
        check_runnable(named_config(backend), has_gpu=gpus > 0)
    except LaunchError as err:
        return str(err)
    if gpus and processes > gpus:
        return f"needs {processes} GPUs, {gpus} here"
    return None


def writes_sharded_state(backend: str) -> bool:
    """Whether the backend checkpoints with accelerate's `save_state` (ZeRO, FSDP)."""
    return backend.startswith("zero") or backend == "fsdp"


def run_logged(
    argv: list[str], log: Path, *, timeout: float, threads: int | None
) -> tuple[int | None, float]:
    """Run `argv` with its output in `log`; its exit status (None: killed after `timeout`) and wall seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            status = None
    return status, time.perf_counter() - started


def kill_tree(proc: subprocess.Popen) -> None:
    # Launchers start their workers in sessions of their own: kill them by id, then the launcher.
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        launcher = psutil.Process(proc.pid)
        for process in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    proc.wait()


def _ended(status: int | None) -> str:
    return "was stopped at its time limit" if status is None else f"exited {status}"


def log_tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])


def versions() -> dict[str, str | None]:
    """Python, CUDA (as torch was built) and the packages a backend runs on (None: not installed)."""
    import torch

    from mftune.train.tracking import package_versions

    found = {"python": platform.python_version(), "cuda": torch.version.cuda}
    return found | package_versions(("mftune", "torch", "transformers", "peft", "accelerate", "deepspeed"))


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# --- check ---------------------------------------------------------------------------------------------


def check_config(
    data_dir: Path, model_dir: Path, cache_dir: Path, method: str, steps: int, processes: int, dtype: str
) -> dict:
    """The config every backend of a method trains with (`train.output_dir` is given per run).

    Micro-batch 1 and 4 micro-batches per step on each process, so accumulation runs under every backend;
    a checkpoint at half the steps, validation at the end (and the baseline at step 0); every step logged.
    """
    return {
        "model": {"name_or_path": str(model_dir), "dtype": dtype},
        "finetune": {"method": method},
        "data": {
            "tasks": {task: {"path": str(data_dir / task)} for task in TASKS},
            "max_seq_len": 256,
            "max_valid_samples": 8,
            "cache_dir": str(cache_dir),
            "num_proc": 1,
        },
        "train": {
            "seed": 0,
            "max_steps": steps,
            "global_batch_size": ROWS_PER_PROCESS * processes,
            "micro_batch_size": 1,
            "learning_rate": 1e-3,
            "warmup_steps": 1,
            "log_every": 1,
            "eval_every": steps,
            "save_every": steps // 2,
            "keep_last": steps,
            "keep_best": 0,
            "resume": "auto",
            "tensorboard": False,
            "plots": False,
        },
    }


@dataclass(frozen=True)
class CheckPlan:
    """Where and how the check runs: folders, model, sizes, tolerances, limits."""

    workdir: Path
    model_dir: Path
    steps: int
    processes: int
    gpus: int
    tol: Tolerances
    timeout: float
    threads: int | None
    deadline: float = math.inf  # `time.monotonic()` past which no run goes on (`--time-budget`)

    def config(self, method: str) -> Path:
        return self.workdir / f"{method}.yaml"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def train(self, backend: str, method: str, run_dir: Path) -> tuple[int | None, float, Path]:
        """One CLI run into `run_dir`; its exit status (None: stopped), wall seconds and log."""
        argv = train_command(backend, self.config(method), [f"train.output_dir={run_dir}"], self.processes)
        log = self.workdir / "logs" / f"{run_dir.name}.log"
        timeout = max(min(self.timeout, self.time_left()), 1)
        status, wall = run_logged(argv, log, timeout=timeout, threads=self.threads)
        return status, wall, log


def prepare_check(args: argparse.Namespace, workdir: Path) -> CheckPlan:
    """The tiny model, the generated data and one config per method, written into `workdir`."""
    import yaml

    from mftune.tiny import build_tiny_model
    from mftune.tiny.examples import write_examples

    model_dir = build_tiny_model(
        workdir / "model",
        "llama",
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
    )
    write_examples(workdir / "examples", scale=DATA_SCALE)
    gpus = gpu_count()
    for method in args.methods:
        raw = check_config(
            workdir / "examples" / "data",
            model_dir,
            workdir / "cache",
            method,
            args.steps,
            args.processes,
            args.dtype,
        )
        (workdir / f"{method}.yaml").write_text(yaml.safe_dump(raw))
    defaults = default_tolerances(gpus > 0)
    tol = Tolerances(
        loss=defaults.loss if args.loss_tol is None else args.loss_tol,
        resume=defaults.resume if args.resume_tol is None else args.resume_tol,
        logits=args.logits_tol,
    )
    deadline = args.started + (args.time_budget or math.inf)
    return CheckPlan(
        workdir, model_dir, args.steps, args.processes, gpus, tol, args.case_timeout, args.threads, deadline
    )


def check_trained(plan: CheckPlan, backend: str, method: str, run_dir: Path) -> list[str]:
    """What is missing or wrong in a finished run's folder (empty: nothing)."""
    from mftune.train.checkpoint import checkpoint_dir, checkpoint_name, is_sharded_checkpoint
    from mftune.train.tracking import read_metrics

    problems = []
    losses = by_step(read_metrics(run_dir), "train/loss")
    if list(losses) != list(range(1, plan.steps + 1)):
        problems.append(f"train/loss logged at steps {list(losses)}, expected 1..{plan.steps}")
    if not all(math.isfinite(v) for v in losses.values()):
        problems.append("a train/loss is not finite")
    marker = "adapter_config.json" if method != "full" else "config.json"
    if not (run_dir / "final" / marker).is_file():
        problems.append(f"no final/{marker}")
    checkpoint = checkpoint_dir(run_dir) / checkpoint_name(plan.steps // 2)
    if not checkpoint.is_dir():
        problems.append(f"no checkpoint {checkpoint.name}")
    elif is_sharded_checkpoint(checkpoint) != writes_sharded_state(backend):
        expected_format = "sharded" if writes_sharded_state(backend) else "portable"
        problems.append(f"{checkpoint.name} is not in the {expected_format} format")
    world_size = run_environment(run_dir).get("world_size")
    expected = 1 if backend == "single" else plan.processes
    if world_size != expected:
        problems.append(f"ran {world_size} process(es), expected {expected}")
    return problems


def run_environment(run_dir: Path) -> dict:
    """The run's `environment.json` (world size, device, GPUs), or {} if it wrote none."""
    path = run_dir / "environment.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_resume(plan: CheckPlan, backend: str, method: str, straight: Path) -> dict:
    """Crash the straight run (in a copy) right after its middle checkpoint, resume it, compare the losses."""
    from mftune.train.checkpoint import checkpoint_name, complete_checkpoints
    from mftune.train.tracking import read_metrics

    middle = plan.steps // 2
    resumed = straight.with_name(f"{straight.name}-resumed")
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "final")
    for later in complete_checkpoints(resumed):
        if later.name > checkpoint_name(middle):  # zero-padded: names sort as steps do
            shutil.rmtree(later)
    status, _, log = plan.train(backend, method, resumed)
    if status != 0:
        return {"ok": False, "max_diff": None, "problems": [f"resumed run {_ended(status)}; log: {log}"]}
    verdict = compare_resumed(read_metrics(straight), read_metrics(resumed), middle, plan.tol.resume)
    lines = log.read_text(errors="replace").splitlines()
    if not any("resumed from" in line and f"(step {middle})" in line for line in lines):
        verdict["problems"].insert(0, f"the log does not say 'resumed from ... (step {middle})'")
        verdict["ok"] = False
    return verdict


def check_export(run_dir: Path, method: str, base_dir: Path, merged_dir: Path, tol: float) -> dict:
    """LoRA: `mftune merge` gives the logits of base + adapter; full: `final/` loads whole. Both trained."""
    import torch
    from transformers import AutoModelForCausalLM

    from mftune.cli import main as mftune_main
    from mftune.infer.load import load_for_inference

    model, tokenizer = load_for_inference(run_dir, device="cpu", dtype=torch.float32)
    input_ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    trained = _logits(model, input_ids)
    standalone_dir = run_dir / "final"
    if method != "full":
        shutil.rmtree(merged_dir, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its one line would break up the progress lines
            status = mftune_main(["merge", str(run_dir), "--out", str(merged_dir)])
        if status != 0:
            return {"ok": False, "max_diff": None, "problems": [f"mftune merge exited {status}"]}
        standalone_dir = merged_dir
    standalone, info = AutoModelForCausalLM.from_pretrained(
        standalone_dir, dtype=torch.float32, output_loading_info=True
    )
    problems = [f"{kind}: {list(keys)[:3]}" for kind, keys in info.items() if keys]
    logits = _logits(standalone, input_ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), input_ids)
    max_diff = float((logits - trained).abs().max())
    if not max_diff <= tol:
        problems.append(f"logits differ from the trained model's by {max_diff:.3g} (tolerance {tol:g})")
    if not float((logits - base).abs().max()) > tol:
        problems.append("logits equal the base model's: nothing was trained")
    return {"ok": not problems, "max_diff": max_diff, "problems": problems}


def _logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def check_case(plan: CheckPlan, backend: str, method: str, reference: list[dict] | None) -> dict:
    """One table row: train, resume, merge and compare one backend with one method."""
    from mftune.train.tracking import read_metrics

    processes = 1 if backend == "single" else plan.processes
    row: dict = {"backend": backend, "method": method, "processes": processes, "problems": []}
    if reason := skip_reason(backend, plan.gpus, processes):
        return {**row, "status": "skipped", "reason": reason}
    straight = plan.workdir / "runs" / f"{method}-{backend}"
    shutil.rmtree(straight, ignore_errors=True)  # resume: auto would continue an old run
    status, row["wall_s"], log = plan.train(backend, method, straight)
    row["log"] = str(log)
    problems = (
        [f"{_ended(status)}; log: {log}"] if status != 0 else check_trained(plan, backend, method, straight)
    )
    row["train_ok"] = not problems
    if problems:
        return {**row, "status": "FAIL", "problems": problems, "log_tail": log_tail(log)}
    environment = run_environment(straight)
    gpus = environment.get("gpus")
    row["device"] = f"{len(gpus)} x {gpus[0]}" if gpus else environment.get("device")
    row["resume"] = check_resume(plan, backend, method, straight)
    merged = straight.with_name(f"{straight.name}-merged")
    try:
        row["merge"] = check_export(straight, method, plan.model_dir, merged, plan.tol.logits)
    except Exception as err:  # a broken export fails its row; the other backends still run
        row["merge"] = {"ok": False, "max_diff": None, "problems": [f"{type(err).__name__}: {err}"]}
    row["problems"] = [*row["resume"]["problems"], *row["merge"]["problems"]]
    if reference is not None and backend != "single":
        row["loss_diff"] = loss_difference(read_metrics(straight), reference)
        if not row["loss_diff"] <= plan.tol.loss:
            row["problems"].append(f"train/loss differs from single's by {row['loss_diff']:.3g}")
    row["status"] = "ok" if not row["problems"] else "FAIL"
    return row


def check_table(rows: list[dict], tol: Tolerances) -> str:
    """The check's results as a markdown table, one row per backend and method."""
    lines = [
        "| backend | method | train ok | resume equal | merge ok | max \\|loss − single\\| | wall s |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        cells = [r["backend"], r["method"]]
        if r["status"] == "skipped":
            cells += [f"skipped: {r['reason']}", "-", "-", "-", "-"]
        else:
            cells.append(_yes_no(r["train_ok"]))
            cells += [_verdict(r.get("resume")), _verdict(r.get("merge"))]
            diff = r.get("loss_diff")
            over = f" (over {tol.loss:g})" if diff is not None and not diff <= tol.loss else ""
            cells.append(
                "reference" if r["backend"] == "single" else "-" if diff is None else f"{diff:.2g}{over}"
            )
            cells.append(f"{r['wall_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        "versions": versions(),
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
            if plan.time_left() < longest:
                left = max(plan.time_left(), 0)
                reason = f"time budget: {left:.0f} s left, ~{longest:.0f} s needed"
                row = {"backend": backend, "method": method, "status": "skipped", "reason": reason}
            else:
                row = check_case(plan, backend, method, reference)
                longest = max(longest, time.monotonic() - started)
            if backend == "single" and row["status"] != "skipped" and row["train_ok"]:
                reference = read_metrics(plan.workdir / "runs" / f"{method}-single")
            report["results"].append(row)
            args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
            note = row.get("reason") or "; ".join(row["problems"]) or "all checks passed"
            print(f"  {method} {backend}: {row['status']}: {note}", flush=True)
            if row.get("log_tail"):
                print(row["log_tail"], file=sys.stderr)
    device = next((r["device"] for r in report["results"] if r.get("device")), "none ran")
    report["device"] = device
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
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


def measure_case(args, tp, profile, workdir: Path, model_dir: Path, backend: str, method: str) -> dict:
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
    raw = tp.mftune_config(workdir, model_dir, run_dir, profile, {"finetune": {"method": method}})
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = workdir / "logs" / f"{name}.log"
    argv = train_command(backend, config, [], processes)
    status, wall = run_logged(argv, log, timeout=args.case_timeout, threads=args.threads)
    row["wall_s"], row["log"] = round(wall, 1), str(log)
    for written in ("checkpoints", "final"):  # GBs each at 1.5B, and not what is measured
        shutil.rmtree(run_dir / written, ignore_errors=True)
    if status != 0:
        oom = "out of memory" in log_tail(log).lower()
        return {**row, "status": "OOM" if oom else "error", "error": log_tail(log).splitlines()[-1]}
    steps = tp.mftune_steps(run_dir)
    summary = tp.summarise({"status": "ok", "steps": steps}, profile)
    peaks = [s["peak_gib"] for s in steps if s["step"] > profile.warmup_steps and s["peak_gib"] is not None]
    row |= summary
    row["peak_gib"] = max(peaks, default=None)  # rank 0's, since its start: the last timed step's
    if row["status"] == "ok":
        row["tps_per_gpu"] = row["tps"] / processes
    return row


def measure_table(rows: list[dict]) -> str:
    """The measurements as a markdown table, with speed and memory relative to `single` of the same method."""
    single = {r["method"]: r for r in rows if r["backend"] == "single" and r["status"] == "ok"}
    lines = [
        "| backend | method | processes | tok/s | tok/s per GPU | peak GiB (rank 0) | tok/s vs single "
        "| memory vs single | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ok, ref = r["status"] == "ok", single.get(r["method"])
        cells = [r["backend"], r["method"], str(r["processes"])]
        cells.append(f"{r['tps']:,.0f}" if ok else f"{r['status']}: {r.get('error', '')}")
        cells.append(f"{r['tps_per_gpu']:,.0f}" if ok else "-")
        cells.append(f"{r['peak_gib']:.1f}" if ok and r.get("peak_gib") is not None else "-")
        cells.append(f"{r['tps'] / ref['tps']:.2f}" if ok and ref else "-")
        both = ok and ref and r.get("peak_gib") and ref.get("peak_gib")
        cells.append(f"{r['peak_gib'] / ref['peak_gib']:.2f}" if both else "-")
        cells.append(str(r.get("wall_s", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_measure(args: argparse.Namespace, workdir: Path) -> int:
    """Data and model once, then every (method, backend) case; the JSON is rewritten after each case.

    Returns:
        1 if a case failed other than by running out of memory, else 0.
    """
    import throughput as tp  # benchmarks/throughput.py, beside this script

    if not args.smoke and gpu_count() == 0:
        raise SystemExit("measure needs a CUDA GPU (on a CPU: measure --smoke)")
    if args.shape not in tp.SHAPES:
        raise SystemExit(f"--shape {args.shape!r}: choose from {', '.join(tp.GPU_SHAPES)}")
    # throughput.py's sizes: 3 warm-up + 20 timed steps of 32,768 tokens in rows of 4,096 (smoke: CPU-sized).
    sizes = {"steps": args.steps, "warmup_steps": args.warmup_steps, "smoke": args.smoke}
    sizes |= dict.fromkeys(("tokens_per_step", "max_len", "median_len"))
    profile = tp.profile_from(argparse.Namespace(**sizes))
    print(f"command: {shlex.join(sys.argv)}")
    corpus = tp.build_corpus(workdir, profile, args.seed)
    limits = argparse.Namespace(threads=args.threads, case_timeout=args.case_timeout)
    model_dir, device_name = tp.Runner(workdir, profile, limits).model(args.shape, tp.SHAPES[args.shape])
    report = {
        "mode": "measure",
        "command": shlex.join(sys.argv),
        "device": device_name,
        "versions": versions(),
        "shape": args.shape,
        "model": tp.model_counts(tp.SHAPES[args.shape]),
        "profile": asdict(profile),
        "data": corpus,
        "results": [],
    }
    print(f"device: {device_name}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), flush=True)
    for method in args.methods:
        for backend in args.backends:
            row = measure_case(args, tp, profile, workdir, model_dir, backend, method)
            report["results"].append(row)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
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
    parser.add_argument("--shape", default="1.5b", help="measure: a model shape of benchmarks/throughput.py")
    parser.add_argument("--seed", type=int, default=0, help="measure: data seed")
    parser.add_argument("--out", type=Path, help="JSON results file (default backends-MODE.json)")
    parser.add_argument(
        "--workdir", type=Path, help="models, data, runs and logs; default: a temporary folder"
    )
    parser.add_argument("--case-timeout", type=int, default=1800, help="seconds before a run is abandoned")
    parser.add_argument(
        "--time-budget",
        type=float,
        help="check: seconds for all rows; a row that would not finish in the time left is skipped",
    )
    parser.add_argument(
        "--row-estimate",
        type=float,
        default=0.0,
        help="check: seconds the first row is expected to take, under --time-budget (default 0)",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads per process (OMP_NUM_THREADS); smoke default 1"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check of the script: backends single and ddp (2 gloo processes), LoRA, a few steps",
    )
    args = parser.parse_args(argv)
    args.started = time.monotonic()
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
    else:
        args.steps = args.steps or (4 if args.smoke else 8)
        args.hidden_size = args.hidden_size or (64 if args.smoke else 256)
        if args.steps < 2:
            parser.error("--steps must be at least 2 (the run is resumed from half of them)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading and saving the small models prints bars between the rows
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"mftune-backends-{args.mode}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        status = (run_measure if args.mode == "measure" else run_check)(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
