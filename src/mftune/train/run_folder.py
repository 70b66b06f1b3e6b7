"""The run folder (`train.output_dir`) is the run's alone: held by a lock while it trains, and never
taken over by a run of another config.

- `hold` writes `.mftune.lock` (host, pid, process start time) before anything else, and removes it on
  exit (with the folder, if the run made it and wrote nothing). A second run on the same folder is
  refused with one line; a lock left by a process that no longer exists on this host (killed with
  SIGKILL, or the machine crashed) is taken over.
- `check_same_run` refuses a folder that holds another config's run (its `resolved_config.yaml` differs
  in something that changes what trains), so that nothing a user has is overwritten or mixed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from mftune.config import ConfigError

LOCK_FILE = ".mftune.lock"
# Keys that may change between a run and its continuation: where the folder is (it may have been moved),
# how often it logs, evaluates and saves, how long it runs, and how its data is read. Everything else must
# be as the run began.
RESUMABLE_CHANGES = (
    "train.output_dir",
    "train.resume",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.keep_best",
    "train.tensorboard",
    "train.plots",
    "train.eval_generate_every",
    "eval.",
    "train.early_stopping.patience",
    "data.num_proc",
    "data.cache_dir",
)


@contextlib.contextmanager
def hold(output_dir: str | Path) -> Iterator[Path]:
    """Hold `output_dir` for this process while the block runs; creates the folder.

    Raises:
        ConfigError: the folder cannot be written, or another live run holds it.
    """
    folder = Path(output_dir)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / LOCK_FILE
        descriptor = _create(lock)
    except OSError as err:  # no permission, a read-only file system, a file in the way
        raise ConfigError(f"train.output_dir {folder}: cannot write there ({err.strerror})") from None
    if descriptor is None:
        owner = _read_settled(lock)
        if _alive(owner):
            raise ConfigError(
                f"train.output_dir {folder} is in use by another mftune run (pid {owner.get('pid')} on "
                f"{owner.get('host')}, since {owner.get('started')}): wait for it or choose another "
                f"output_dir; if that run is gone, delete {lock}"
            )
        lock.unlink(missing_ok=True)  # a dead run's: taken over
        descriptor = _create(lock)
        if descriptor is None:
            raise ConfigError(f"train.output_dir {folder} was taken by another run just now")
    with os.fdopen(descriptor, "w") as f:
        json.dump(_me(), f)
    try:
        yield folder
    finally:
        if _read(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):  # a run that stopped before writing: leave no trace
            folder.rmdir()


def check_same_run(output_dir: str | Path, config: dict[str, Any]) -> None:
    """Refuse a run folder that already holds a run, unless this run continues it with the same config.

    Args:
        output_dir: `train.output_dir`.
        config: the new run's resolved config as plain data (`config_to_dict`).

    Raises:
        ConfigError: `train.resume` is never, or the configs differ (naming the first keys that do).
    """
    saved_path = Path(output_dir) / "resolved_config.yaml"
    if not saved_path.is_file():
        return
    if config["train"]["resume"] == "never":
        raise ConfigError(
            f"train.output_dir {output_dir} holds a run already and train.resume is never: choose another "
            "output_dir, or set train.resume: auto to continue it"
        )
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    differ = [key for key in _differences(saved, config) if not key.startswith(RESUMABLE_CHANGES)]
    if differ:
        shown = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
        raise ConfigError(
            f"train.output_dir {output_dir} holds another run (its resolved_config.yaml differs in {shown}): "
            "choose another output_dir, or delete that run"
        )


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(dict.fromkeys([*a, *b]))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _create(lock: Path) -> int | None:
    try:
        return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None


def _me() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _start_time(os.getpid()),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _read(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read_settled(lock: Path, tries: int = 10) -> dict[str, Any]:
    """The lock's content, waiting a moment for a run that has just created it to fill it in."""
    for _ in range(tries):
        if owner := _read(lock):
            return owner
        time.sleep(0.1)
    return {}  # still empty: left by a process that died between creating and writing it


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the lock's process still runs (one on another host is assumed to)."""
    if not owner:
        return False
    if owner.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    # The same pid with another start time is a new process that reused the number.
    started = _start_time(pid)
    return started is not None and started == owner.get("process_start")


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
