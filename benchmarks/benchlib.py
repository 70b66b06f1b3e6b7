"""What the benchmark scripts share to run and report: subprocesses on a time budget, the command-line
flags every script takes, and the tables, versions and JSON of their reports.

- `run_logged` runs a command with its output in a log and stops it, children included, at a timeout;
- `Deadline` is what is left of a `--time-budget`;
- `add_run_flags` and `in_workdir`: `--out`, `--workdir`, `--case-timeout`, `--time-budget`, `--threads`,
  and a temporary work folder removed afterwards unless `--workdir` names one;
- `markdown_table`, `versions`, `write_json`.

Benchmarks import it by name (`import benchlib`): they run as scripts from this folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Every subprocess runs offline: a hidden download fails at once instead of hanging.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LOG_TAIL = 15


# --- processes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deadline:
    """The end of a `--time-budget`: `time.monotonic()` past which nothing more runs (inf: no budget)."""

    at: float = math.inf

    @classmethod
    def after(cls, seconds: float | None, start: float) -> Deadline:
        return cls(math.inf if seconds is None else start + seconds)

    def left(self) -> float:
        return self.at - time.monotonic()

    def timeout(self, limit: float) -> float:
        """Seconds a subprocess may run: `limit`, or less if the budget ends first (at least 1)."""
        return max(min(limit, self.left()), 1.0)

    def binds(self, limit: float) -> bool:
        """Whether the budget, not `limit`, is what would stop a subprocess started now."""
        return self.left() < limit


def run_logged(
    argv: list[str], log: Path, *, timeout: float, threads: int | None = None
) -> tuple[int | None, float]:
    """Run `argv` offline with its output in `log`; its exit status (None: killed at `timeout`) and seconds."""
    env = {**os.environ, **OFFLINE}
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
    """Kill `proc` and every process it started, then reap it."""
    # Launchers start their workers in sessions of their own: kill them by id, then the launcher.
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        launcher = psutil.Process(proc.pid)
        for process in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    proc.wait()


def log_tail(log: Path, lines: int = LOG_TAIL) -> str:
    """The last `lines` lines of a log."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    """A TCP port nothing listens on now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- command line -----------------------------------------------------------------------------------


def add_run_flags(parser: argparse.ArgumentParser, *, out: str) -> None:
    """The flags of every benchmark that runs cases in subprocesses; `out` describes `--out`'s default."""
    parser.add_argument("--out", type=Path, help=f"JSON results file (default {out})")
    parser.add_argument(
        "--workdir", type=Path, help="models, data, runs and logs; default: a temporary folder"
    )
    parser.add_argument("--case-timeout", type=int, default=1800, help="seconds before one case is abandoned")
    parser.add_argument(
        "--time-budget",
        type=float,
        help="seconds for the whole run: what would not finish in the time left is skipped, what is still "
        "running when it is spent is stopped; both are reported and do not fail the run",
    )
    parser.add_argument("--threads", type=int, help="CPU threads per process (OMP_NUM_THREADS)")


def in_workdir(args: argparse.Namespace, prefix: str, run: Callable[[argparse.Namespace, Path], int]) -> None:
    """`run(args, workdir)` in `--workdir` or a temporary folder (removed after), quietly; exit with its status.

    The time budget counts from here.
    """
    args.deadline = Deadline.after(args.time_budget, time.monotonic())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        status = run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    raise SystemExit(status)


# --- reports ----------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """A markdown table; the columns whose indices are in `right` are right-aligned (numbers)."""
    right = set(right)
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    lines = [" | ".join(header), " | ".join(rule), *(" | ".join(cells) for cells in rows)]
    return "\n".join(f"| {line} |" for line in lines)


def on_off(value: bool | None) -> str:
    return "-" if value is None else ("on" if value else "off")


def versions(packages: Sequence[str]) -> dict[str, str | None]:
    """Python's version, the CUDA version torch was built with, and each package's (None: not installed)."""
    import torch

    from mftune.train.tracking import package_versions

    return {"python": platform.python_version(), "cuda": torch.version.cuda} | package_versions(
        tuple(packages)
    )


def write_json(path: Path, report: dict) -> None:
    """The report as indented JSON (rewritten after every case, so a stopped run keeps what it measured)."""
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
