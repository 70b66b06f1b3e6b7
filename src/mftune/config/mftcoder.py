"""Read an MFTCoder train config (its JSON `--train_config`) as an mftune config.

`MFTCODER_KEYS` below is the whole mapping, and `docs/mftcoder-compat.md` is generated from it.
Each MFTCoder key is either mapped to an mftune key (renamed, or converted by a function named in
`_CONVERTERS`) or ignored with the reason. A `null` MFTCoder value keeps mftune's default. Keys that
are mftune sections (`model`, `data`, ...) may be mixed in and win over mapped values; any other key
is an error.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mftune.config.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """How one MFTCoder key is read: the mftune key it sets ("" when ignored) and a note."""

    target: str
    note: str = ""
    values: Mapping[Any, Any] = field(default_factory=dict)  # renamed choices; empty: value kept as is


_IGNORED_LEGACY = "legacy MFTCoder option without effect"

MFTCODER_KEYS: dict[str, Key] = {
    # data
    "data_paths": Key(
        "data.tasks",
        'a list, or MFTCoder\'s bracketed string "[path1,path2]"; tasks are named after their folders',
    ),
    "data_weights": Key(
        "data.tasks.<name>.sampling_weight", "one number per path, in the same list or bracketed form"
    ),
    "task_weights": Key(
        "data.tasks.<name>.loss_weight", "one number per path; MFTCoder ignores them under coba"
    ),
    "tokenize_mode": Key(
        "data.tasks.<name>.format",
        "sft: formats detected per file; sst (pre-training): every task read as text",
    ),
    "data_split": Key(
        "data.valid_ratio", '"train,valid,test" shares: valid / total; mftune makes no test split'
    ),
    "seq_length": Key("data.max_seq_len"),
    "padding_mode": Key("data.packing", values={"padding": "none", "pack": "contiguous"}),
    "role_markers": Key("data.template.role_markers", "a mapping with system, user and assistant"),
    "load_raw_dataset": Key("", "data is always read from the task folders, then cached tokenized"),
    "use_dynamic_padding": Key("", "rows are always padded to the longest in the batch"),
    "shuffle_before_split": Key("", "the train/valid split is always shuffled, seeded by data.seed"),
    "use_random_sampler": Key("", "batches are always drawn in a seeded random order"),
    # model
    "pretrained_model_path": Key("model.name_or_path"),
    "model_type": Key("", "the architecture is read from the model's config.json"),
    "tokenizer_type": Key("", "tokenizers are loaded with AutoTokenizer"),
    "vocab_file": Key("", "the tokenizer comes from model.tokenizer or the model folder"),
    "trust_remote_code": Key("model.trust_remote_code"),
    "attn_implementation": Key("model.attention"),
    "gradient_checkpointing": Key("model.gradient_checkpointing", values={True: "on", False: "off"}),
    "bf16": Key("model.dtype", "true: bfloat16"),
    "fp16": Key("model.dtype", "true: float16"),
    "low_cpu_mem_usage": Key("", "model loading is managed by mftune"),
    # fine-tuning method
    "peft_type": Key("finetune.method", "lora or qlora; absent or null: full fine-tuning"),
    "quantization": Key(
        "finetune.qlora.bits", '"4bit" or "8bit"; like MFTCoder, only used with peft_type qlora'
    ),
    "lora_rank": Key("finetune.lora.r"),
    "lora_alpha": Key("finetune.lora.alpha"),
    "lora_dropout": Key("finetune.lora.dropout"),
    "target_modules": Key("finetune.lora.target_modules"),
    # optimisation
    "weighted_loss_mode": Key("train.loss", "case1-case4 are aliases of token, sample, task, task_sample"),
    "per_device_train_batch_size": Key("train.micro_batch_size"),
    "gradient_accumulation_steps": Key(
        "train.global_batch_size",
        "per_device_train_batch_size × gradient_accumulation_steps, for one process",
    ),
    "per_device_eval_batch_size": Key("", "mftune has no separate evaluation batch size"),
    "learning_rate": Key("train.learning_rate"),
    "min_lr": Key("train.min_lr"),
    "weight_decay": Key("train.weight_decay"),
    "lr_scheduler_type": Key(
        "train.lr_schedule",
        values={
            "cosine": "cosine",
            "linear": "linear",
            "constant": "constant",
            "constant_with_warmup": "constant",
        },
    ),
    "num_warmup_steps": Key(
        "train.warmup_steps", "a number below 1 is a fraction of all steps: train.warmup_ratio"
    ),
    "num_train_epochs": Key("train.epochs"),
    "max_train_steps": Key("train.max_steps"),
    "seed": Key("train.seed", "also data.seed"),
    # evaluation, checkpoints, logging
    "evaluation_steps": Key("train.eval_every"),
    "eval_steps": Key("train.eval_every"),
    "checkpointing_steps": Key("train.save_every"),
    "log_interval": Key("train.log_every"),
    "saving_limit": Key("train.keep_last"),
    "epoch_checkpointing": Key("", "checkpoints are written every train.save_every steps and at the end"),
    "early_stopping": Key(
        "train.early_stopping.patience", "true: patience early_stopping_stall_num (MFTCoder's default 5)"
    ),
    "early_stopping_stall_num": Key(
        "train.early_stopping.patience", "used while early_stopping is true (its default)"
    ),
    "output_dir": Key("train.output_dir"),
    "tb_dir": Key("", "TensorBoard logs are written under train.output_dir"),
    "resume_from_checkpoint": Key("train.resume", "a checkpoint path"),
    "auto_resume": Key("train.resume", "true: auto, false: never; resume_from_checkpoint wins"),
    "verbose": Key("", "log verbosity is not part of the run config"),
    # CoBa
    "coba_warmup_steps": Key("coba.warmup"),
    "coba_history_length": Key("coba.history"),
    "coba_tau": Key("coba.tau"),
    "coba_update_interval": Key("coba.update_interval"),
    "coba_sample_valid_num": Key("coba.probe_batches"),
    # distribution: chosen by the launcher
    "distributed_type": Key("", "chosen by the accelerate config you launch with"),
    "world_size": Key("", "the number of processes comes from the launcher"),
    "init_timeout_seconds": Key("", "process-group set-up is managed by accelerate"),
    "use_xformers": Key("", _IGNORED_LEGACY),
    "weight_by_num_documents": Key("", _IGNORED_LEGACY),
    "make_vocab_size_divisible_by": Key("", _IGNORED_LEGACY),
    "model_parallel_size": Key("", _IGNORED_LEGACY),
    "use_slow_tokenizer": Key("", _IGNORED_LEGACY),
}

_SECTIONS = ("model", "finetune", "data", "train", "coba")
_MFTCODER_EARLY_STOPPING_STALL = 5

Updates = dict[tuple[str, ...], Any]
Converter = Callable[[Mapping[str, Any], list[str]], Updates]


def looks_like_mftcoder(raw: Mapping[str, Any]) -> bool:
    """Whether a raw config uses MFTCoder's (flat) keys."""
    return any(key in MFTCODER_KEYS for key in raw)


def from_mftcoder(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Translate an MFTCoder train config into a raw mftune config.

    Args:
        raw: the parsed MFTCoder JSON, optionally with mftune sections mixed in (those win).

    Returns:
        The raw mftune config (still to be validated), and one note per MFTCoder key saying where it
        went or why it was ignored, plus any assumption made.

    Raises:
        ConfigError: unknown keys, and values that cannot be translated (all listed, one per line).
    """
    notes: list[str] = []
    errors: list[str] = []
    updates: Updates = {}
    if "peft_type" not in raw:
        updates[("finetune", "method")] = "full"
        notes.append("peft_type: absent, so finetune.method is full")
    for key, value in raw.items():
        if key in _SECTIONS:
            continue
        spec = MFTCODER_KEYS.get(key)
        if spec is None:
            errors.append(_unknown(key))
        elif not spec.target:
            notes.append(f"{key}: ignored ({spec.note})")
        else:
            try:
                # A null keeps mftune's default, unless a converter gives null its MFTCoder meaning.
                convert = _CONVERTERS.get(key, _renamer(key, spec))
                converted = {} if value is None and key not in _CONVERTERS else convert(raw, notes)
            except ValueError as err:
                errors.append(str(err))
                continue
            updates.update(converted)
            if value is None and not converted:
                notes.append(f"{key}: null, mftune's default kept")
            else:
                notes.append(f"{key} → {', '.join('.'.join(path) for path in converted) or spec.target}")
    if errors:
        raise ConfigError("\n".join(dict.fromkeys(errors)))
    out: dict[str, Any] = {}
    for path, value in updates.items():
        _set(out, path, value)
    for section in _SECTIONS:
        if section in raw:
            out[section] = _merge(out.get(section), raw[section])
    return out, list(dict.fromkeys(notes))


def mftcoder_reference_markdown() -> str:
    """The mapping table of `docs/mftcoder-compat.md`."""
    rows = ["| MFTCoder key | mftune key | notes |", "|---|---|---|"]
    for key, spec in MFTCODER_KEYS.items():
        target = f"`{spec.target}`" if spec.target else "ignored"
        note = spec.note
        if spec.values:
            note = ", ".join(f"`{_literal(k)}` → `{v}`" for k, v in spec.values.items()) + (
                f"; {note}" if note else ""
            )
        cell = note.replace("|", "\\|")
        rows.append(f"| `{key}` | {target} | {cell} |")
    return "\n".join(rows) + "\n"


def _renamer(key: str, spec: Key) -> Converter:
    def convert(raw: Mapping[str, Any], notes: list[str]) -> Updates:
        value = raw[key]
        if spec.values:
            if not isinstance(value, Hashable) or value not in spec.values:
                raise ValueError(f"{key}: {value!r} is not one of {', '.join(repr(v) for v in spec.values)}")
            value = spec.values[value]
        return {tuple(spec.target.split(".")): value}

    return convert


def _tasks(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    paths = _parse_list(raw["data_paths"], "data_paths")
    tasks: list[dict[str, Any]] = [{"path": path} for path in paths]
    for key, field_name in (("data_weights", "sampling_weight"), ("task_weights", "loss_weight")):
        if raw.get(key) is None:
            continue
        weights = [_number(item, key) for item in _parse_list(raw[key], key)]
        if len(weights) != len(paths):
            raise ValueError(f"{key}: {len(weights)} entries for {len(paths)} data_paths")
        for task, weight in zip(tasks, weights, strict=True):
            task[field_name] = weight
    mode = raw.get("tokenize_mode")
    if mode not in (None, "sft", "sst"):
        raise ValueError(f"tokenize_mode: {mode!r} is not one of 'sft', 'sst'")
    if mode == "sst":
        for task in tasks:
            task["format"] = "text"
    return {("data", "tasks"): tasks}


def _needs_data_paths(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    # Folded into the tasks by `_tasks`; alone they have nothing to attach to.
    if raw.get("data_paths") is None:
        given = [key for key in ("data_weights", "task_weights", "tokenize_mode") if raw.get(key) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: given without data_paths")
    return {}


def _parse_list(value: Any, key: str) -> list[str]:
    """Read a list, or MFTCoder's bracketed string form `"[a, b]"`, strictly.

    Whitespace and quotes around items are stripped; nothing else is dropped.

    Raises:
        ValueError: not a list or bracketed string, or an empty item.
    """
    if isinstance(value, list):
        items = [str(item).strip() for item in value]
    elif isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        items = [item.strip().strip("'\"").strip() for item in value.strip()[1:-1].split(",")]
    else:
        raise ValueError(
            f'{key}: expected a list or a bracketed string like "[path/to/a,path/to/b]", got {value!r}'
        )
    if not all(items):
        raise ValueError(f"{key}: an entry is empty in {value!r}")
    return items


def _valid_ratio(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    if raw["data_split"] is None:
        return {}
    text = str(raw["data_split"])
    try:
        shares = [float(part) for part in re.split(r"[,/]", text)]
    except ValueError:
        raise ValueError(
            f'data_split: expected "train,valid,test" percentages such as "98,2,0", got {text!r}'
        ) from None
    if not 1 <= len(shares) <= 3 or min(shares) < 0 or shares[0] <= 0:
        raise ValueError(f'data_split: expected "train,valid,test" percentages, train above 0, got {text!r}')
    train, valid, test = [*shares, 0.0, 0.0][:3]
    if test:
        notes.append(f"data_split: the test share ({test:g}) is ignored; mftune makes no test split")
    return {("data", "valid_ratio"): valid / (train + valid + test)}


def _method(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    peft, quantization = raw.get("peft_type"), raw.get("quantization")
    if peft not in (None, "lora", "qlora"):
        raise ValueError(f"peft_type: {peft!r} is not one of 'lora', 'qlora' (or null for full fine-tuning)")
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"quantization: {quantization!r} is not one of '4bit', '8bit' or null")
    updates: Updates = {("finetune", "method"): peft or "full"}
    if peft == "qlora":
        updates[("finetune", "qlora", "bits")] = 8 if quantization == "8bit" else 4
    elif quantization is not None:
        notes.append(f"quantization: {quantization!r} ignored, as in MFTCoder, since peft_type is not qlora")
    return updates


def _batch(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    if raw.get("per_device_train_batch_size") is None and raw.get("gradient_accumulation_steps") is None:
        return {}
    micro = _or_default(raw.get("per_device_train_batch_size"), 1)
    accumulation = _or_default(raw.get("gradient_accumulation_steps"), 1)
    notes.append(
        "train.global_batch_size = per_device_train_batch_size × gradient_accumulation_steps assumes one "
        "process: multiply it by the number of processes to keep MFTCoder's batch"
    )
    updates: Updates = {("train", "global_batch_size"): micro * accumulation}
    if raw.get("per_device_train_batch_size") is not None:
        updates[("train", "micro_batch_size")] = micro
    return updates


def _warmup(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    value = raw["num_warmup_steps"]
    if value is None:
        return {}
    # MFTCoder reads a float below 1 as a fraction of the training steps.
    if isinstance(value, float) and value < 1:
        return {("train", "warmup_ratio"): value}
    return {("train", "warmup_steps"): value}


def _seed(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    seed = raw["seed"]
    return {} if seed is None else {("train", "seed"): seed, ("data", "seed"): seed}


def _early_stopping(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    enabled = raw.get("early_stopping", True) is not False
    stall = _or_default(raw.get("early_stopping_stall_num"), _MFTCODER_EARLY_STOPPING_STALL)
    return {("train", "early_stopping", "patience"): stall if enabled else None}


def _resume(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    if raw.get("resume_from_checkpoint"):
        return {("train", "resume"): raw["resume_from_checkpoint"]}
    return {("train", "resume"): "never" if raw.get("auto_resume") is False else "auto"}


def _dtype(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    if raw.get("bf16") and raw.get("fp16"):
        raise ValueError("bf16, fp16: both are true; choose one")
    dtype = "bfloat16" if raw.get("bf16") else "float16" if raw.get("fp16") else None
    return {} if dtype is None else {("model", "dtype"): dtype}


_CONVERTERS: dict[str, Converter] = {
    "data_paths": _tasks,
    "data_weights": _needs_data_paths,
    "task_weights": _needs_data_paths,
    "tokenize_mode": _needs_data_paths,
    "data_split": _valid_ratio,
    "peft_type": _method,
    "quantization": _method,
    "per_device_train_batch_size": _batch,
    "gradient_accumulation_steps": _batch,
    "num_warmup_steps": _warmup,
    "seed": _seed,
    "early_stopping": _early_stopping,
    "early_stopping_stall_num": _early_stopping,
    "resume_from_checkpoint": _resume,
    "auto_resume": _resume,
    "bf16": _dtype,
    "fp16": _dtype,
}


def _unknown(key: str) -> str:
    known = [*MFTCODER_KEYS, *_SECTIONS]
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" — did you mean '{match[0]}'?" if match else ""
    return f"unknown key '{key}' (neither an MFTCoder key nor an mftune section){hint}"


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _number(item: Any, key: str) -> float:
    try:
        return float(item)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: {item!r} is not a number") from None


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base.get(key), value)
        return merged
    return override


def _literal(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
