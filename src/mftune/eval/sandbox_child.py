"""The process a generated program runs in, started by `mftune.eval.sandbox` as
`python -I THIS CPU_SECONDS MEMORY_BYTES FILE_SIZE_BYTES MAX_PROCESSES UID GID READ_ALL` (UID and GID -1:
stay; READ_ALL 0 or 1).

Standard library only (it runs in isolated mode, without mftune on its path), and as few imports as
it can do with: a sandbox start is paid once per program. It forks: the parent
supervises (it is process 1 of the private PID namespace when there is one, and init there ignores
signals it has no handler for, so the program must not be it), and the child sets the resource limits
and no_new_privs, drops root to `nobody` when asked (keeping only the capability to read files when
asked, for a Python installation `nobody` cannot read), and runs `program.py` from the working folder. Exactly one JSON line
reaches the original stdout: `STATUS<TAB>MESSAGE`.
"""

import ctypes
import errno
import os
import resource
import signal
import sys

PROGRAM = "program.py"
_SIGNALS = {
    signal.SIGXCPU: ("killed", "CPU time limit"),
    signal.SIGKILL: ("killed", "killed (SIGKILL: CPU time or memory limit)"),
    signal.SIGXFSZ: ("killed", "file size limit"),
    signal.SIGSEGV: ("error", "segmentation fault"),
    signal.SIGABRT: ("error", "aborted"),
}


def main() -> None:
    cpu, memory, file_size, processes, uid, gid, read_all = (int(a) for a in sys.argv[1:8])
    limits = {
        "cpu_seconds": cpu,
        "memory_bytes": memory,
        "file_size_bytes": file_size,
        "max_processes": processes,
        "uid": None if uid < 0 else uid,
        "gid": None if gid < 0 else gid,
        "read_all": bool(read_all),
    }
    report_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the program's own output is not kept
        os.dup2(devnull, fd)
    worker = os.fork()
    if worker == 0:
        _run_program(limits, report_fd)  # never returns
    _, status = os.waitpid(worker, 0)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        kind, message = _SIGNALS.get(signum, ("killed", f"signal {signal.Signals(signum).name}"))
        _report(report_fd, kind, message)
    # A worker that exits without a signal has reported, unless the program ended it (os._exit): the
    # caller reads a missing report as that.
    # Outside a PID namespace, take down whatever the program left behind: the group is this process's
    # own (the caller starts it in a new session), never a shell's that ran it by hand.
    if os.getpid() != 1 and os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _run_program(limits: dict, report_fd: int) -> None:
    me = os.getpid()
    try:
        _limit(limits)
        status, message = _execute()
    except BaseException as err:  # the limits themselves could not be set
        status, message = "error", f"sandbox set-up failed: {err}"
    if os.getpid() != me:  # a process the program forked: it reports nothing
        os._exit(1)
    _report(report_fd, status, message)
    os._exit(0)


def _limit(limits: dict) -> None:
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
    libc = ctypes.CDLL(None, use_errno=True)
    # No program may gain privileges by running a setuid binary (su, mount ...).
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if limits.get("uid") is None:
        return
    read_all = limits.get("read_all", False)
    if read_all:  # keep capabilities across setuid, to keep one of them below
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "keepcaps")
    os.setgroups([])
    os.setgid(limits["gid"])
    os.setuid(limits["uid"])
    if read_all:
        # Root's Python often lives where `nobody` cannot read (/root/.pyenv): keep only the capability to
        # read and search any file, never to write one, so the interpreter and its packages load.
        header = _CapHeader(_CAPABILITY_VERSION_3, 0)
        mask = 1 << _CAP_DAC_READ_SEARCH
        data = (_CapData * 2)(_CapData(mask, mask, 0), _CapData(0, 0, 0))
        _check(libc.capset(ctypes.byref(header), data), "capset")


_PR_SET_KEEPCAPS, _PR_SET_NO_NEW_PRIVS = 8, 38
_CAPABILITY_VERSION_3, _CAP_DAC_READ_SEARCH = 0x20080522, 2


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what} failed: {os.strerror(ctypes.get_errno())}")


def _execute() -> tuple[str, str]:
    try:
        with open(PROGRAM, encoding="utf-8") as f:
            code = compile(f.read(), PROGRAM, "exec")
        exec(code, {"__name__": "__main__", "__file__": PROGRAM, "__builtins__": __builtins__})
    except AssertionError as err:
        return "failed", _describe(err)
    except MemoryError:
        return "killed", "memory limit (MemoryError)"
    except BlockingIOError as err:
        return "killed", f"process limit ({err})"
    except OSError as err:
        if err.errno == errno.EFBIG:
            return "killed", "file size limit"
        return "error", _describe(err)
    except SystemExit as err:
        return "error", f"the program called exit({err.code!r}) before its tests finished"
    except BaseException as err:
        return "error", _describe(err)
    return "passed", ""


def _describe(err: BaseException) -> str:
    """The exception line, and for a bare assert the line of the program that failed."""
    import traceback  # only on failure: it costs a few milliseconds per start

    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.endswith(PROGRAM)]
    if frames and frames[-1].line:
        text += f" (line {frames[-1].lineno}: {frames[-1].line.strip()})"
    return text.splitlines()[0][:400] if text else type(err).__name__


def _report(fd: int, status: str, message: str) -> None:
    line = message.replace("\t", " ").replace("\n", " ").replace("\r", " ")
    os.write(fd, f"{status}\t{line}\n".encode("utf-8", "replace"))


if __name__ == "__main__":
    main()
