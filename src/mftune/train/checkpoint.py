"""Checkpoints that a run can always resume from.

A checkpoint is written into a hidden temporary folder and renamed into place as the last step, so a
process killed at any moment leaves either a complete checkpoint or none: resume never sees half of one.
Its last file is `manifest.json`, the size and SHA-256 of every other file: a checkpoint damaged later (a
partial copy, a full disk, a flipped byte) is found at resume, which then falls back to an older one.
Weights are safetensors; optimizer, scheduler and RNG states are tensors and plain data loaded with
`weights_only=True`.

Under ZeRO and FSDP no rank holds the whole optimizer state (nor, under ZeRO-3 and FSDP, the weights):
there every rank writes its own shards with `accelerator.save_state` into `accelerate_state/`, beside the
same scheduler and trainer state files, and the main process renames the folder once all are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
SHARDED_STATE = "accelerate_state"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None
    evals_without_improvement: int = 0
    last_metric: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: all of them in full fine-tuning, the adapter under LoRA."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
) -> Path:
    """Write `checkpoints/step-XXXXXXXX` atomically and return its path."""
    root = checkpoint_dir(output_dir)
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
    )
    torch.save(_rng_state(), tmp / "rng.pt")
    _publish(tmp, final, state)
    return final


def load_trainable(path: str | Path, model: torch.nn.Module) -> None:
    """Copy a checkpoint's trained weights into `model`'s trainable parameters, which must match them.

    Raises:
        ValueError: the checkpoint's parameters are not the model's trainable ones.
    """
    path = Path(path)
    weights = load_file(path / "trainable.safetensors")
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"{path} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG states in place; return the trainer state.

    Raises:
        ValueError: the checkpoint's parameters do not match the model's trainable ones.
    """
    path = Path(path)
    load_trainable(path, model)
    states = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return _read_state(path)


def save_sharded_checkpoint(accelerator, output_dir: str | Path, scheduler: Any, state: TrainerState) -> Path:
    """Write `checkpoints/step-XXXXXXXX` from every rank at once; call it on all ranks.

    Returns:
        The checkpoint's path.
    """
    root = checkpoint_dir(output_dir)
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{final.name}-sharded"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / SHARDED_STATE))
    if accelerator.is_main_process:
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
        _publish(tmp, final, state)
    accelerator.wait_for_everyone()
    return final


def load_sharded_checkpoint(accelerator, path: str | Path, scheduler: Any) -> TrainerState:
    """Restore what `save_sharded_checkpoint` wrote (weights, optimizer, RNG, scheduler); call it on all ranks."""
    path = Path(path)
    accelerator.load_state(str(path / SHARDED_STATE))
    states = torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu")
    scheduler.load_state_dict(states["scheduler"])
    return _read_state(path)


def _publish(tmp: Path, final: Path, state: TrainerState) -> None:
    """Write the trainer state and the manifest last, then rename the finished temporary folder into place."""
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if final.exists():  # a rerun of the same step replaces the old copy
        shutil.rmtree(final)
    os.rename(tmp, final)


def damage(path: str | Path) -> str | None:
    """What is wrong with a checkpoint against its manifest (a file missing, of another size or with
    another SHA-256), or None if it is intact. A checkpoint without a manifest is read as intact: older
    mftune versions wrote none."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None if (path / STATE_FILE).is_file() else f"{path / STATE_FILE} is missing"
    except (OSError, ValueError):
        return f"{path / MANIFEST} cannot be read"
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{file} has {file.stat().st_size} bytes, {entry['size']} were written"
        if _sha256(file) != entry["sha256"]:
            return f"{file} differs from what was written (SHA-256)"
    return None


def latest_intact_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that `damage` finds nothing wrong with, warning about each newer damaged one.

    Raises:
        ConfigError: there are checkpoints, but every one is damaged (starting over would silently
            throw the run away).
    """
    from mftune.config import ConfigError

    found = complete_checkpoints(output_dir)
    problems = []
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            if problems:
                warnings.warn(f"resuming from {path.name}: {'; '.join(problems)}", stacklevel=2)
            return path
        problems.append(f"{path.name} is damaged ({problem})")
    if problems:
        raise ConfigError(
            f"every checkpoint in {checkpoint_dir(output_dir)} is damaged ({problems[0]}, ...): delete them "
            "to start over, or set train.resume to one of them"
        )
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _read_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))


def is_adapter_folder(path: str | Path) -> bool:
    """Whether `path` holds a PEFT adapter (as `save_pretrained` writes one) rather than an mftune checkpoint."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / STATE_FILE).is_file()


def warm_start_adapter(model: torch.nn.Module, path: str | Path) -> None:
    """Load a PEFT adapter's weights (safetensors only) into `model`'s adapters, which must match them.

    Raises:
        ConfigError: the folder has no safetensors weights, the model has no adapters, or the names or
            shapes do not match.
    """
    from peft import set_peft_model_state_dict

    from mftune.config import ConfigError

    path = Path(path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        found = (
            "adapter_model.bin (a pickle, which mftune does not load)"
            if (path / "adapter_model.bin").is_file()
            else "no adapter weights"
        )
        raise ConfigError(f"train.resume: {path} holds {found}; save the adapter as safetensors")
    if not hasattr(model, "peft_config"):
        raise ConfigError(f"train.resume: {path} is an adapter, but finetune.method trains no adapter")
    result = set_peft_model_state_dict(model, load_file(weights_file))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"train.resume: the adapter in {path} does not match finetune.lora "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )


def check_resumable(path: str | Path) -> None:
    """Raise a one-line `ConfigError` unless `path` is a complete, intact mftune checkpoint."""
    from mftune.config import ConfigError

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"train.resume: {path} does not exist")
    if (path / STATE_FILE).is_file() and (problem := damage(path)):
        raise ConfigError(f"train.resume: checkpoint {path} is damaged: {problem}")
    if not (path / STATE_FILE).is_file():
        hint = (
            "a model folder: to start from its weights set model.name_or_path to it"
            if (path / "config.json").is_file()
            else f"no {STATE_FILE}"
        )
        raise ConfigError(f"train.resume: {path} is not an mftune checkpoint ({hint})")


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` was written by `save_sharded_checkpoint`."""
    return (Path(path) / SHARDED_STATE).is_dir()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of killed writes are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep_last: int | None, keep_best: int, mode: str) -> list[Path]:
    """Delete all but the newest `keep_last` (None: all) and the best `keep_best` checkpoints, and stale
    temporaries.

    Returns:
        The deleted paths.
    """
    found = complete_checkpoints(output_dir)
    keep = set(found if keep_last is None else found[-keep_last:])
    scored = [(p, _metric(p)) for p in found]
    scored = [(p, m) for p, m in scored if m is not None]
    scored.sort(key=lambda pm: pm[1], reverse=mode == "max")
    keep |= {p for p, _ in scored[:keep_best]}
    deleted = [p for p in found if p not in keep]
    for p in deleted:
        shutil.rmtree(p, ignore_errors=True)
    for tmp in checkpoint_dir(output_dir).glob(".tmp-step-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)
    return deleted


def _metric(path: Path) -> float | None:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("last_metric")


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, gauss_state, gauss_next = state["python"]
    random.setstate((version, tuple(gauss_state), gauss_next))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
