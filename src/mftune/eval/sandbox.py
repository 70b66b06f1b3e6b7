"""Run generated programs, each in a process of its own with limits, and say how each ended.

Per program: a fresh temporary folder (the working folder is `work/` inside it, so `../x` stays inside;
HOME and TMPDIR point into it), a minimal environment (nothing of the caller's: no tokens, no keys), a
new session whose whole process group is killed at the wall-clock timeout, and resource limits on CPU
seconds, address space, file size and processes (`sandbox_child.py` sets them). Where the machine allows
it (`unshare`, as root or with unprivileged user namespaces) the program also gets a private network
namespace, which has no interface but a loopback that is down, and a private PID namespace, which the
kernel tears down with everything in it when the program ends. Run as root, programs run as `nobody`.

This contains mistakes, not attackers: the program still sees the file system with the permissions of
the user it runs as (as `nobody` when mftune runs as root, else as the caller), and without a PID
namespace a program that leaves its session can outlive the timeout. docs/evaluation.md says more.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from mftune.config.eval_schema import SandboxConfig

Status = Literal["passed", "failed", "error", "timeout", "killed"]
CHILD = Path(__file__).with_name("sandbox_child.py")
# --mount-proc gives the PID namespace its own /proc: no other process (nor its environment) is visible.
_NAMESPACES = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
# Numerical libraries start a thread per core, each reserving address space the memory limit counts.
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONHASHSEED": "0",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class Outcome:
    """How one program ended: `passed`, `failed` (an assertion), `error` (with the exception line),
    `timeout`, or `killed` (a resource limit); `seconds` of wall time."""

    status: Status
    message: str
    seconds: float


@dataclass(frozen=True)
class Isolation:
    """What protected the programs, as written into results.json."""

    network_namespace: bool
    pid_namespace: bool
    user: str
    timeout_s: float
    cpu_seconds: int
    memory_mb: int
    file_size_mb: int
    max_processes: int
    workers: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunAs:
    """The user programs run as: `uid`/`gid` to switch to (None: stay), and whether it keeps the
    capability to read every file."""

    uid: int | None
    gid: int | None
    read_all: bool
    label: str


# Imports from the standard library, the way a HumanEval program does.
_PROBE = "import typing, collections, math\nassert sum(range(4)) == 6\n"


class SandboxError(RuntimeError):
    """The sandbox cannot give what the config asks (`network: isolated` without namespaces)."""


class Sandbox:
    """Runs programs under `SandboxConfig`'s limits, `workers` at a time."""

    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        namespaces = cfg.network != "allowed" and namespaces_available()
        if cfg.network == "isolated" and not namespaces:
            raise SandboxError(
                "eval.sandbox.network is 'isolated', but this machine gives no private network namespace "
                "(`unshare --net --pid` fails here); set it to auto (run without) or run where it works"
            )
        self.prefix = _namespace_command() if namespaces else []
        self.user = self._choose_user()
        self.isolation = Isolation(
            network_namespace=namespaces,
            pid_namespace=namespaces,
            user=self.user.label,
            timeout_s=cfg.timeout,
            cpu_seconds=cfg.cpu_seconds,
            memory_mb=cfg.memory_mb,
            file_size_mb=cfg.file_size_mb,
            max_processes=cfg.max_processes,
            workers=cfg.workers,
        )

    def _choose_user(self) -> RunAs:
        """As root: `nobody`, if a probe program imports there, else `nobody` that may read every file; as
        another user, that user."""
        if os.geteuid() != 0 or (nobody := _nobody()) is None:
            return RunAs(None, None, False, pwd.getpwuid(os.geteuid()).pw_name)
        for read_all in (False, True):
            self.user = RunAs(*nobody, read_all, "")
            if self.run(_PROBE).status == "passed":
                label = "nobody, able to read every file" if read_all else "nobody"
                return RunAs(*nobody, read_all, label)
        raise SandboxError(
            f"programs cannot run as nobody here (the probe ended: {self.run(_PROBE).message}); "
            "run mftune eval as an ordinary user"
        )

    def run_many(self, programs: Sequence[str]) -> list[Outcome]:
        """Every program's outcome, in order, `workers` of them running at a time."""
        if self.cfg.workers == 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(self.cfg.workers) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: str) -> Outcome:
        """Run one program (Python source) and say how it ended."""
        root = Path(tempfile.mkdtemp(prefix="mftune-sandbox-"))
        try:
            work = self._prepare(root, program)
            return self._execute(root, work)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _prepare(self, root: Path, program: str) -> Path:
        work = root / "work"
        for folder in (work, root / "home", root / "tmp"):
            folder.mkdir()
        (work / "program.py").write_text(program, encoding="utf-8")
        if self.user.uid is not None:
            uid, gid = self.user.uid, self.user.gid
            for path in (root, work, root / "home", root / "tmp", work / "program.py"):
                os.chown(path, uid, gid)
        return work

    def _execute(self, root: Path, work: Path) -> Outcome:
        user = self.user
        limits = [
            self.cfg.cpu_seconds,
            self.cfg.memory_mb << 20,
            self.cfg.file_size_mb << 20,
            # RLIMIT_NPROC counts every process of the user: allow max_processes more than it has now.
            _processes_of(user.uid) + self.cfg.max_processes,
            -1 if user.uid is None else user.uid,
            -1 if user.gid is None else user.gid,
            int(user.read_all),
        ]
        env = {**_ENV, "HOME": str(root / "home"), "TMPDIR": str(root / "tmp")}
        command = [*self.prefix, sys.executable, "-I", str(CHILD), *map(str, limits)]
        start = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out, _ = process.communicate(timeout=self.cfg.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return Outcome("timeout", f"no result within {self.cfg.timeout:g} s", time.monotonic() - start)
        seconds = time.monotonic() - start
        _kill_group(process)  # anything the program left running
        return _outcome(out, process.returncode, seconds)


def _outcome(out: bytes, returncode: int, seconds: float) -> Outcome:
    for line in out.decode("utf-8", "replace").splitlines():
        status, _, message = line.partition("\t")
        if status in ("passed", "failed", "error", "killed"):
            return Outcome(status, message, seconds)  # type: ignore[arg-type]
    if returncode < 0:
        return Outcome("killed", f"killed by {signal.Signals(-returncode).name}", seconds)
    return Outcome(
        "error", f"the program ended its process (status {returncode}) before its tests finished", seconds
    )


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@functools.cache
def namespaces_available() -> bool:
    """Whether `unshare` gives this process private network and PID namespaces (checked once)."""
    if shutil.which("unshare") is None:
        return False
    try:
        result = subprocess.run(
            [*_namespace_command(), "true"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _namespace_command() -> list[str]:
    # Without root, a user namespace (mapping the caller to root inside) is what permits the others.
    return _NAMESPACES if os.geteuid() == 0 else [*_NAMESPACES, "--map-root-user"]


def _processes_of(uid: int | None) -> int:
    uid = os.getuid() if uid is None else uid
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                continue
    return count


def _nobody() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid
