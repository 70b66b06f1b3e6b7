"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard, the environment snapshot and plots;
and the training time and memory its metrics report."""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl`, and mirrors scalars to TensorBoard.

    Appending (not truncating) keeps a resumed run's history in one file; `resume_from` drops lines
    logged after the checkpoint the run resumed from, so the file reads like an uninterrupted run.
    """

    def __init__(self, output_dir: str | Path, *, tensorboard: bool, resume_from: int | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from is not None and self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_from
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        elif resume_from is None:
            self.path.write_text("")
        self.tb = _tensorboard_writer(Path(output_dir) / "tensorboard") if tensorboard else None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not values:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class TrainClock:
    """Training time between log lines: the wall time, less whatever runs inside `paused()`.

    CUDA kernels run asynchronously, so the device is synchronized where time is read (`lap`, once per log
    line) and where a pause begins, so that queued training work is not counted as paused; never per step.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._start = time.perf_counter()
        self._paused = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave out the time spent inside (evaluation, checkpoint saves)."""
        self._synchronize()  # the paused work would wait for the queued kernels anyway
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    def lap(self) -> float:
        """Seconds of training since the previous lap (or since the clock was made); starts the next lap."""
        self._synchronize()
        now = time.perf_counter()
        seconds = now - self._start - self._paused
        self._start, self._paused = now, 0.0
        return seconds

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors on a CUDA device so far, in GiB; None on other devices.

    This is `torch.cuda.max_memory_allocated`: since the process started, or since the caller last reset
    the peak statistics; not what the caching allocator reserves.
    """
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(
            "tensorboard is not installed (pip install 'mftune[tensorboard]'); logging to metrics.jsonl only",
            stacklevel=3,
        )
        return None
    return SummaryWriter(str(folder))


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each distribution, None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        versions[name] = None
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def environment_snapshot(world_size: int, device: str) -> dict[str, Any]:
    """Package versions, git commit, devices: enough to tell two runs' setups apart."""
    names = (
        "mftune",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "tokenizers",
        "deepspeed",
        "bitsandbytes",
    )
    snapshot: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: v for name, v in package_versions(names).items() if v is not None},
        "device": device,
        "world_size": world_size,
        "git_commit": git_commit(),
    }
    if torch.cuda.is_available():
        snapshot["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return snapshot


def git_commit() -> str | None:
    """The commit of the checkout mftune runs from, None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_json(path: str | Path, value: Any) -> None:
    Path(path).write_text(json.dumps(value, indent=1, default=str) + "\n", encoding="utf-8")


def plot_task_curves(output_dir: str | Path, task_names: list[str]) -> Path | None:
    """Per-task train loss, valid loss and weight over steps, as `plots/tasks.png`; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'mftune[plots]'); no plots", stacklevel=2)
        return None
    rows = read_metrics(output_dir)
    panels = [
        ("train/{}/loss", "train loss"),
        ("valid/{}/loss", "valid loss"),
        ("train/{}/weight", "task weight"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (pattern, title) in zip(axes, panels, strict=True):
        for task in task_names:
            key = pattern.format(task)
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=task)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_lines():  # a panel with no points yet (a run shorter than log_every) has no legend
            ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(output_dir) / "plots" / "tasks.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
