"""`mftune launch`: run `mftune train` on many devices or machines through `accelerate launch`.

A shipped accelerate config is chosen by name (`ddp`, `zero2`, ...) or a user's file is given; the
command is built by `launch_command`, a pure function, and run as a child process whose exit code
becomes ours.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

# The accelerate configs shipped in `mftune/configs/accelerate/`, by the name `--accelerate` takes.
NAMED_CONFIGS = ("ddp", "zero2", "zero2-offload", "zero3", "zero3-offload", "fsdp")
# Backends that need CUDA devices (accelerate runs only DDP on CPUs).
_GPU_ONLY = {"DEEPSPEED", "FSDP"}


class LaunchError(ValueError):
    """A launch that cannot work here: an unknown config, a missing package, a backend without GPUs."""


@dataclass(frozen=True)
class Topology:
    """Where the processes run.

    Attributes:
        num_processes: processes over all machines (accelerate's meaning); None: every GPU of every machine.
        num_machines: machines (nodes).
        machine_rank: this machine's index, 0 on the one that hosts the rendezvous.
        main_process_ip: address of machine 0 (needed with several machines).
        main_process_port: its rendezvous port (accelerate's default 29500 when None).
    """

    num_processes: int | None = None
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None


def named_config(name: str) -> Path:
    """The path of a shipped accelerate config, e.g. `named_config("zero3")`."""
    return Path(str(resources.files("mftune") / "configs" / "accelerate" / f"{name}.yaml"))


def resolve_config(name_or_file: str) -> Path:
    """A shipped config's path for one of `NAMED_CONFIGS`, else the user's file.

    Raises:
        LaunchError: neither a shipped name nor an existing file.
    """
    if name_or_file in NAMED_CONFIGS:
        return named_config(name_or_file)
    path = Path(name_or_file)
    if path.is_file():
        return path
    raise LaunchError(
        f"--accelerate {name_or_file!r} is neither a shipped config ({', '.join(NAMED_CONFIGS)}) nor a file"
    )


def launch_command(
    config: str | Path,
    overrides: list[str],
    accelerate_config: Path,
    topology: Topology,
    *,
    num_processes: int,
    cpu: bool = False,
    python: str = sys.executable,
) -> list[str]:
    """The argv of `accelerate launch ... -m mftune.cli train CONFIG OVERRIDES`.

    Args:
        config: the mftune config file.
        overrides: `key.path=value` overrides, passed on unchanged.
        accelerate_config: the accelerate config file (see `resolve_config`).
        topology: machines, this machine's rank and the rendezvous address.
        num_processes: processes over all machines (`topology.num_processes`, or its default).
        cpu: no GPU here: train in float32 (the shipped configs ask for bf16 mixed precision).
        python: the interpreter that runs accelerate and mftune.
    """
    argv = [python, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
    argv += ["--num_processes", str(num_processes), "--num_machines", str(topology.num_machines)]
    argv += ["--machine_rank", str(topology.machine_rank)]
    if topology.main_process_ip is not None:
        argv += ["--main_process_ip", topology.main_process_ip]
    if topology.main_process_port is not None:
        argv += ["--main_process_port", str(topology.main_process_port)]
    if cpu:
        argv += ["--mixed_precision", "no"]
    return [*argv, "-m", "mftune.cli", "train", str(config), *overrides]


def check_runnable(accelerate_config: Path, *, has_gpu: bool) -> None:
    """Fail before launching what cannot run here.

    Raises:
        LaunchError: DeepSpeed or FSDP without GPUs, or DeepSpeed not installed.
    """
    settings = yaml.safe_load(accelerate_config.read_text(encoding="utf-8")) or {}
    backend = str(settings.get("distributed_type", "NO")).upper()
    if backend in _GPU_ONLY and not has_gpu:
        raise LaunchError(
            f"{accelerate_config.name} ({backend}) needs CUDA GPUs; without them use --accelerate ddp, "
            "which runs on CPUs"
        )
    if backend == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"{accelerate_config.name} needs DeepSpeed: pip install 'mftune[deepspeed]'")


def launch(config: str, overrides: list[str], accelerate: str, topology: Topology) -> int:
    """Resolve the accelerate config, check it can run here, run the launch, return its exit code.

    SIGTERM (a scheduler's stop) is passed on to the training processes, which save a checkpoint and exit
    cleanly, so the launch does too.
    """
    import torch

    accelerate_config = resolve_config(accelerate)
    gpus = torch.cuda.device_count()
    check_runnable(accelerate_config, has_gpu=gpus > 0)
    num_processes = topology.num_processes or max(1, gpus) * topology.num_machines
    argv = launch_command(
        config, overrides, accelerate_config, topology, num_processes=num_processes, cpu=gpus == 0
    )
    print(" ".join(argv), flush=True)
    child = subprocess.Popen(argv)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _stop_workers(child.pid))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_workers(launcher_pid: int) -> None:
    # The launcher (accelerate, running torchrun's agent in its process) would treat a SIGTERM of its own as
    # a failure; its children, the training processes, save a checkpoint and exit 0 on SIGTERM.
    import psutil

    launcher = psutil.Process(launcher_pid)
    for process in launcher.children() or [launcher]:
        process.send_signal(signal.SIGTERM)
