"""One row of the backend check: train a tiny model under a backend through the CLI, resume it from half
way, merge or reload what it wrote, and compare its losses with `single`'s (benchmarks/backends.py).

The comparisons are pure functions of metrics.jsonl rows (`compare_resumed`, `loss_difference`); the
rest runs `mftune train` or `mftune launch` in subprocesses and reads what they wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from importlib import util
from pathlib import Path

from benchlib import Deadline, free_port, log_tail, run_logged

TASKS = ("arithmetic", "list_ops", "write_function", "write_test")
DATA_SCALE = 0.1  # of the example tasks' sizes: 505 records in all
ROWS_PER_PROCESS = 4  # the check's global batch per process, micro-batch 1: 4 micro-batches per step
PROBE_TEXT = (
    "<|im_start|>user\nWrite a function `f(x)` that returns x plus 3.<|im_end|>\n<|im_start|>assistant\n"
)


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


def _ended(status: int | None) -> str:
    return "was stopped at its time limit" if status is None else f"exited {status}"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# --- the steps of a row ----------------------------------------------------------------------------


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
    deadline: Deadline = field(default_factory=Deadline)  # of `--time-budget`

    def config(self, method: str) -> Path:
        return self.workdir / f"{method}.yaml"

    def train(self, backend: str, method: str, run_dir: Path) -> tuple[int | None, float, Path]:
        """One CLI run into `run_dir`; its exit status (None: stopped), wall seconds and log."""
        argv = train_command(backend, self.config(method), [f"train.output_dir={run_dir}"], self.processes)
        log = self.workdir / "logs" / f"{run_dir.name}.log"
        timeout = self.deadline.timeout(self.timeout)
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
    return CheckPlan(
        workdir,
        model_dir,
        args.steps,
        args.processes,
        gpus,
        tol,
        args.case_timeout,
        args.threads,
        args.deadline,
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
