"""What `mftune eval` evaluates: a run folder, one of its checkpoints, or a model folder; and loading it.

A run is evaluated through its `final/` (adapter or full model) without merging; a checkpoint is
rebuilt as training built the model, from the run's resolved config, with the checkpoint's trained
weights loaded in. Either way the tokenizer carries the run's chat template and the generation config
its stop token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

RUN_CONFIG = "resolved_config.yaml"


class TargetError(ValueError):
    """A TARGET that is neither a run, a checkpoint nor a model folder, or one that cannot be evaluated."""


@dataclass(frozen=True)
class Target:
    """A resolved TARGET.

    Attributes:
        path: As given.
        model_dir: The folder `load_for_inference` loads (a run's `final/`, a model folder), or None for
            a checkpoint.
        run_config: The run's `resolved_config.yaml`, when TARGET belongs to a run.
        checkpoint: The checkpoint folder, for a checkpoint.
    """

    path: Path
    model_dir: Path | None
    run_config: Path | None
    checkpoint: Path | None

    @property
    def default_out(self) -> Path:
        return self.path / "eval"


def resolve_target(path: str | Path) -> Target:
    """Tell what TARGET is.

    Raises:
        TargetError: Not a folder; a run that has no `final/` yet; a sharded checkpoint; or a folder
            that is none of these.
    """
    from mftune.train import checkpoint as ckpt

    path = Path(path)
    if not path.is_dir():
        raise TargetError(f"TARGET {path} is not a folder")
    if (path / RUN_CONFIG).is_file():
        if not (path / "final").is_dir():
            found = ckpt.latest_checkpoint(path)
            hint = f": evaluate a checkpoint, e.g. {found}" if found else ""
            raise TargetError(f"TARGET {path} is a run without final/ (still training, or stopped){hint}")
        return Target(path, path / "final", path / RUN_CONFIG, None)
    if (path / ckpt.STATE_FILE).is_file():
        run_config = path.parent.parent / RUN_CONFIG
        if ckpt.is_sharded_checkpoint(path):
            raise TargetError(
                f"TARGET {path} holds sharded state (DeepSpeed ZeRO or FSDP): evaluate the run's final/, "
                "or resume the run to finish it"
            )
        if not run_config.is_file():
            raise TargetError(
                f"TARGET {path} is a checkpoint, but its run has no {RUN_CONFIG} at {run_config}"
            )
        if problem := ckpt.damage(path):
            raise TargetError(f"TARGET {path} is a damaged checkpoint: {problem}")
        return Target(path, None, run_config, path)
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return Target(path, path, None, None)
    raise TargetError(
        f"TARGET {path} is neither a run folder ({RUN_CONFIG}), a checkpoint (trainer_state.json) nor a "
        "model folder (config.json or adapter_config.json)"
    )


def load_target(target: Target, run_cfg, device: torch.device):
    """(model in eval mode, tokenizer with the chat template) for `target`.

    Args:
        target: From `resolve_target`.
        run_cfg: The run's `Config` (needed for a checkpoint).
        device: Where to run.
    """
    from mftune.infer.load import load_for_inference

    if target.model_dir is not None:
        return load_for_inference(target.model_dir, device=device)
    from mftune.data.pipeline import load_tokenizer, prepare_data
    from mftune.model.load import load_model
    from mftune.train.checkpoint import load_trainable

    tokenizer = load_tokenizer(run_cfg.model)
    data = prepare_data(run_cfg, tokenizer)
    model = load_model(run_cfg.model, run_cfg.finetune, device=device)
    load_trainable(target.checkpoint, model)
    tokenizer.chat_template = data.template.chat_template()
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(data.stop_token)} - {None}
    model.generation_config.eos_token_id = sorted(stop_ids)
    model.config.use_cache = True
    return model.eval(), tokenizer


def load_target_tokenizer(target: Target, run_cfg):
    """The tokenizer alone (for --dry-run), carrying the chat template the model would use."""
    from transformers import AutoTokenizer

    if target.model_dir is not None:
        from mftune.infer.load import adapter_base, is_adapter_dir

        folder = target.model_dir
        if not (folder / "tokenizer_config.json").is_file() and is_adapter_dir(folder):
            return AutoTokenizer.from_pretrained(adapter_base(folder))
        return AutoTokenizer.from_pretrained(folder)
    from mftune.data.pipeline import load_tokenizer, prepare_data

    tokenizer = load_tokenizer(run_cfg.model)
    tokenizer.chat_template = prepare_data(run_cfg, tokenizer).template.chat_template()
    return tokenizer


def context_length(model) -> int | None:
    """The longest sequence the model takes, from its config, when it says."""
    from mftune.model.hidden import model_config

    config = model_config(model)
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
