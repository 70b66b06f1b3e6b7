"""Everything one GPU session should measure, in one command within a time budget.

`benchmarks/gpu_session.sh` installs the carried wheels and then runs this. Each part is a subprocess
with a deadline, so a part that hangs or runs long costs only its own share, and whatever would not fit
is skipped and reported, never silently dropped:

1. environment: the GPU, its driver and clocks, package versions, and a bf16 matmul's TFLOP/s (the
   measured ceiling, printed beside MFU's datasheet peak);
2. checks, side by side (both train tiny models, so they barely load the GPU):
   - `pytest -m gpu`: every gpu-marked test, without `-x`, so one failure does not hide the others;
   - `benchmarks/backends.py check`: single, zero2, zero3 and fsdp, one process each, LoRA then full:
     train, resume, merge, losses against single;
3. throughput, alone on the GPU: three `benchmarks/throughput.py` grids (`GRIDS`), in this order:
   - `0.5b`: full and LoRA, mftune against TRL's SFTTrainer at their defaults, then at their fastest;
   - `1.5b`: a full fine-tune, mftune at its fastest (MFU);
   - `7b`: QLoRA on one 4,096-token row per step, mftune at its default (peak memory);
4. report: `gpu_session.json`, `gpu_session.md` (tables and the goals) and `logs.tar.gz` under `--out`.

A part may use the time left over by the parts before it, never what the parts after it reserve.

    bash benchmarks/gpu_session.sh                  # on the GPU machine, ~8 minutes
    bash benchmarks/gpu_session.sh --smoke          # the same sequence on a CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import kill_tree
from gpu_session_report import DATASHEET_TFLOPS, failures, goals, markdown, not_measured, write_logs

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
CHECKED_BACKENDS = ("single", "zero2", "zero3", "fsdp")
PACKAGES = (
    "mftune", "torch", "transformers", "peft", "accelerate", "tokenizers", "pydantic", "trl", "datasets",
    "deepspeed", "bitsandbytes", "liger-kernel", "flash-attn",
)  # fmt: skip


@dataclass(frozen=True)
class Part:
    """One step of the session.

    Attributes:
        name: how the report names it.
        budget: the most seconds it may take, time left over by earlier parts included.
        reserve: seconds kept for it while the parts before it run.
    """

    name: str
    budget: float
    reserve: float


@dataclass(frozen=True)
class Grid:
    """One `benchmarks/throughput.py` run: its flags, and those added under --smoke."""

    name: str
    flags: tuple[str, ...]
    smoke_flags: tuple[str, ...] = ()


# mftune's fastest runs 4 rows per forward pass (its varlen kernel's cost does not grow with them); TRL's
# runs 1: without flash-attn its padding-free batches go through sdpa with a dense block mask over the
# whole micro-batch, whose cost grows with the square of the tokens in it. No search: it costs minutes.
GRIDS = (
    Grid("0.5b", (
        "--shapes", "0.5b", "--methods", "full", "lora", "--sides", "mftune", "trl",
        "--settings", "default", "fastest", "--steps", "4", "--warmup-steps", "2",
        "--fastest-micro", "mftune=4", "trl=1", "--case-estimate", "40",
    )),
    Grid("1.5b", (
        "--shapes", "1.5b", "--methods", "full", "--sides", "mftune", "--settings", "fastest",
        "--steps", "4", "--warmup-steps", "2", "--fastest-micro", "mftune=2", "--case-estimate", "60",
    )),
    Grid("7b", (
        "--shapes", "7b", "--methods", "qlora", "--sides", "mftune", "--settings", "default",
        "--steps", "2", "--warmup-steps", "1", "--tokens-per-step", "4096", "--max-len", "4096",
        "--case-estimate", "90",
    ), smoke_flags=("--tokens-per-step", "256", "--max-len", "256")),
)  # fmt: skip
PARTS = (
    Part("environment", budget=40, reserve=10),
    Part("checks", budget=150, reserve=100),
    Part("throughput 0.5b", budget=240, reserve=120),
    Part("throughput 1.5b", budget=100, reserve=60),
    Part("throughput 7b", budget=160, reserve=90),
    Part("report", budget=10, reserve=5),
)


def part_deadline(name: str, now: float, end: float, parts: tuple[Part, ...] = PARTS) -> float:
    """When the part `name`, starting at `now`, must stop: its budget, and what the later parts reserve."""
    index = next(i for i, p in enumerate(parts) if p.name == name)
    return min(now + parts[index].budget, end - sum(p.reserve for p in parts[index + 1 :]))


# --- running parts -----------------------------------------------------------------------------------


@dataclass
class Session:
    """Where the session writes, when it must end, and what each part reported."""

    workdir: Path
    smoke: bool
    end: float  # `time.monotonic()` by which the report must be written
    report: dict = field(default_factory=dict)

    def deadline(self, part: str) -> float:
        return part_deadline(part, time.monotonic(), self.end)

    def start(self, argv: list[str], log_name: str) -> subprocess.Popen:
        """Start `argv` with its output in `logs/LOG_NAME.log`, in a new session (to stop its children)."""
        log = self.workdir / "logs" / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        with log.open("w") as out:
            out.write(f"$ {shlex.join(argv)}\n")
            out.flush()
            return subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )

    def run(self, argv: list[str], log_name: str, part: str) -> int | None:
        return finish(self.start(argv, log_name), self.deadline(part))


def finish(proc: subprocess.Popen, deadline: float) -> int | None:
    """Wait for `proc` until `deadline`; its exit status, or None after killing it and its children."""
    try:
        return proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return None


def seconds_left(deadline: float) -> int:
    return max(int(deadline - time.monotonic()), 1)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- the parts -----------------------------------------------------------------------------------------


def probe_environment() -> dict:
    """Date, versions, device and, on CUDA, the bf16 8192³ matmul rate (median of 10, after 3 warm-ups)."""
    import torch

    from mftune.train.tracking import git_commit, package_versions

    found: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": os.environ.get("MFTUNE_COMMIT") or git_commit(),
        "cuda": torch.version.cuda,
        "versions": package_versions(PACKAGES),
        "device": platform.processor() or "cpu",
        "matmul_tflops": None,
    }
    if not torch.cuda.is_available():
        return found
    found["device"] = torch.cuda.get_device_name()
    found["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    found["nvidia_smi"] = _nvidia_smi()
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds = []
    for _ in range(13):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        torch.cuda.synchronize()
        seconds.append(start.elapsed_time(stop) / 1e3)
    found["matmul_tflops"] = 2 * 8192**3 / sorted(seconds[3:])[5] / 1e12
    return found


def _nvidia_smi() -> str | None:
    """What `nvidia-smi` reports of the GPU (a query: it changes no setting)."""
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        argv = ["nvidia-smi", f"--query-gpu={query}", "--format=csv"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() or None
    return None


def run_environment(session: Session) -> None:
    path = session.workdir / "environment.json"
    status = session.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe-environment", str(path)],
        "environment",
        "environment",
    )
    session.report["environment"] = read_json(path) or {"status": status, "error": "the probe did not finish"}


def run_checks(session: Session) -> None:
    """`pytest -m gpu` and the backend check at the same time, both stopped at the part's deadline."""
    deadline = session.deadline("checks")
    junit, checked = session.workdir / "pytest.xml", session.workdir / "backends.json"
    pytest = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    pytest += ["--junitxml", str(junit), str(REPO / "tests")]
    backends = [sys.executable, str(BENCHMARKS / "backends.py"), "check", "--backends", *CHECKED_BACKENDS]
    backends += ["--processes", "1", "--out", str(checked), "--workdir", str(session.workdir / "backends")]
    backends += ["--time-budget", str(seconds_left(deadline) - 5), *(["--smoke"] if session.smoke else [])]
    running = {"tests": session.start(pytest, "pytest"), "backends": session.start(backends, "backends")}
    status = {name: finish(proc, deadline) for name, proc in running.items()}
    session.report["tests"] = {"status": status["tests"], "cases": junit_outcomes(junit)}
    session.report["backends"] = {"status": status["backends"], **read_json(checked)}


def junit_outcomes(path: Path) -> list[dict]:
    """Per test: its id, outcome (passed, failed, error, skipped) and the first line of why, if not passed."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                message = next(iter((child.get("message") or child.text or "").strip().splitlines()), "")
        test = f"{case.get('classname')}::{case.get('name')}"
        cases.append({"test": test, "outcome": outcome, "message": message})
    return cases


def run_throughput(session: Session, grid: Grid) -> None:
    part = f"throughput {grid.name}"
    out = session.workdir / f"throughput-{grid.name}.json"
    argv = [sys.executable, str(BENCHMARKS / "throughput.py"), "--peak-tflops", str(DATASHEET_TFLOPS)]
    argv += [*grid.flags, *(("--smoke", *grid.smoke_flags) if session.smoke else ())]
    argv += ["--out", str(out), "--workdir", str(session.workdir / f"throughput-{grid.name}")]
    argv += ["--time-budget", str(seconds_left(session.deadline(part)) - 5)]
    status = session.run(argv, f"throughput-{grid.name}", part)
    session.report.setdefault("throughput", {})[grid.name] = {"status": status, **read_json(out)}


# --- the report ----------------------------------------------------------------------------------------


def write_report(session: Session, out: Path, elapsed: float, budget: float) -> int:
    """gpu_session.json, gpu_session.md and logs.tar.gz under `out`; the markdown printed. 1 if a check failed."""
    report = session.report
    report |= {"elapsed_s": elapsed, "budget_s": budget}
    report["goals"] = goals(report.get("throughput", {}), report.get("environment", {}).get("matmul_tflops"))
    report["not_measured"], report["failed"] = not_measured(report), failures(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_session.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    (out / "gpu_session.md").write_text(text)
    write_logs(session.workdir, out / "logs.tar.gz")
    print(text + ("\nfailed: " + "; ".join(report["failed"]) if report["failed"] else ""))
    return int(bool(report["failed"]))


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the same sequence on a CPU, with tiny shapes")
    parser.add_argument("--budget", type=float, help="seconds for the whole session (default 480; smoke 600)")
    parser.add_argument(
        "--elapsed",
        type=float,
        default=0.0,
        help="seconds already spent (installing wheels), given as --elapsed=N",
    )
    parser.add_argument(
        "--out", type=Path, help="where the report goes (default $OUT, else runs/gpu-session)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="models, data, runs and logs (default: a temporary folder)"
    )
    parser.add_argument("--probe-environment", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.budget = args.budget or (600.0 if args.smoke else 480.0)
    args.out = args.out or Path(os.environ.get("OUT") or REPO / "runs" / "gpu-session")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe_environment:
        args.probe_environment.write_text(json.dumps(probe_environment(), indent=1))
        return
    started = time.monotonic() - args.elapsed
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mftune-gpu-session-"))
    session = Session(workdir, args.smoke, end=started + args.budget)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--elapsed")]
    session.report |= {"command": shlex.join(["benchmarks/gpu_session.sh", *given]), "smoke": args.smoke}
    steps = [("environment", run_environment), ("checks", run_checks)]
    steps += [(f"throughput {g.name}", lambda s, g=g: run_throughput(s, g)) for g in GRIDS]
    try:
        for part, run in steps:
            print(f"== {part}: at most {seconds_left(session.deadline(part))} s", flush=True)
            run(session)
        status = write_report(session, args.out, time.monotonic() - started, args.budget)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
