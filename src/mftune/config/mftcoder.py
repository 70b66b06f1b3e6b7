"""Read an MFTCoder train config (its JSON `--train_config`) as an mftune config that trains what MFTCoder trains.

`mftcoder_keys.MFTCODER_KEYS` lists every key: what MFTCoder's code does with it, the mftune key, and the
difference; `docs/mftcoder-compat.md` is generated from it. Keys left out take MFTCoder's defaults (its
`MftTrainArgs`), not mftune's. Each key is renamed, converted by a function of `_CONVERTERS`, or has no
effect, and every one gets a note saying which; the notes also say where mftune trains differently.
Keys that are mftune sections (`model`, `data`, ...) may be mixed in and win over translated values;
any other key is an error.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from mftune.config.errors import ConfigError
from mftune.config.mftcoder_keys import MFTCODER_KEYS, PREFERENCE_KEYS, Key, reference_markdown

# MFTCoder's defaults (`MftTrainArgs` in mftcoder_accelerate/src/pefts/mft_arguments.py) of the keys that
# change what trains.
MFTCODER_DEFAULTS: dict[str, Any] = {
    "data_split": "98,2,0",
    "padding_mode": "padding",
    "tokenize_mode": "sft",
    "weighted_loss_mode": "case3",
    "peft_type": "qlora",
    "lora_rank": 96,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 5e-5,
    "min_lr": 5e-6,
    "weight_decay": 0.01,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "num_warmup_steps": 0.05,
    "num_train_epochs": 4,
    "seed": 1234,
    "seq_length": 4096,
    "auto_resume": True,
    "log_interval": 10,
    "checkpointing_steps": 100,
    "evaluation_steps": 100,
    "early_stopping": True,
    "early_stopping_stall_num": 5,
    "saving_limit": None,
    "coba_warmup_steps": 100,
    "coba_history_length": 200,
    "coba_tau": 5,
    "coba_update_interval": 1,
    "coba_sample_valid_num": 1,
    "attn_implementation": "flash_attention_2",
}
_SECTIONS = ("model", "finetune", "data", "train", "coba")
_FULL_FINETUNE_SAVING_LIMIT = 2  # what MFTCoder's mft_accelerate sets when saving_limit is null

Updates = dict[tuple[str, ...], Any]
Converter = Callable[[Mapping[str, Any], list[str]], Updates]


def looks_like_mftcoder(raw: Mapping[str, Any]) -> bool:
    """Whether a raw config uses MFTCoder's (flat) keys."""
    return any(key in MFTCODER_KEYS or key in PREFERENCE_KEYS for key in raw)


def from_mftcoder(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Translate an MFTCoder train config into a raw mftune config.

    Args:
        raw: the parsed MFTCoder JSON, optionally with mftune sections mixed in (those win).

    Returns:
        The raw mftune config (still to be validated), and notes: where each MFTCoder key went or why
        it has no effect, which defaults were MFTCoder's, and where mftune trains differently.

    Raises:
        ConfigError: a preference-training config, unknown keys, and values that cannot be translated
            (all listed, one per line).
    """
    preference = [key for key in PREFERENCE_KEYS if key in raw]
    if preference:
        raise ConfigError(
            f"an MFTCoder preference-training (DPO/ORPO) config (key '{preference[0]}'): mftune trains "
            "supervised multi-task fine-tuning only; train it with MFTCoder's xxpo entry point or TRL"
        )
    defaults = {key: value for key, value in MFTCODER_DEFAULTS.items() if key not in raw}
    raw = {**defaults, **raw}
    notes: list[str] = []
    if defaults:
        notes.append(
            "left out, so MFTCoder's defaults: " + ", ".join(f"{k} {v!r}" for k, v in defaults.items())
        )
    notes.append(
        "trust_remote_code: MFTCoder always runs a checkpoint's own code; mftune does so only with "
        "model.trust_remote_code: true"
    )
    notes.append("relative paths are read from the working folder, as MFTCoder reads them")
    errors: list[str] = []
    updates: Updates = {("train", "adam_beta2"): 0.999, ("train", "min_lr_mode"): "floor"}
    for key, value in raw.items():
        if key in _SECTIONS:
            continue
        spec = MFTCODER_KEYS.get(key)
        if spec is None:
            errors.append(_unknown(key))
            continue
        try:
            converted = _convert(key, spec, raw, notes)
        except ValueError as err:
            errors.append(str(err))
            continue
        updates.update(converted)
        if not spec.target:
            notes.append(f"{key}: no effect ({spec.difference or spec.mftcoder})")
        elif value is None and not converted:
            notes.append(f"{key}: null, mftune's default kept")
        else:
            where = ", ".join(".".join(path) for path in converted) or spec.target
            notes.append(f"{key} → {where}" + (f" (differs: {spec.difference})" if spec.difference else ""))
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
    return reference_markdown()


def _convert(key: str, spec: Key, raw: Mapping[str, Any], notes: list[str]) -> Updates:
    if key in _CONVERTERS:
        return _CONVERTERS[key](raw, notes)
    if not spec.target or raw[key] is None:
        return {}  # no effect, or null: mftune's default
    value = raw[key]
    if spec.values:
        if not isinstance(value, Hashable) or value not in spec.values:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(repr(v) for v in spec.values)}")
        value = spec.values[value]
    return {tuple(spec.target.split(".")): value}


def _tasks(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    paths = _parse_list(raw["data_paths"], "data_paths")
    tasks: list[dict[str, Any]] = [{"path": path} for path in paths]
    if raw.get("task_weights") is not None:
        weights = [_number(item, "task_weights") for item in _parse_list(raw["task_weights"], "task_weights")]
        if len(weights) != len(paths):
            raise ValueError(f"task_weights: {len(weights)} entries for {len(paths)} data_paths")
        for task, weight in zip(tasks, weights, strict=True):
            task["loss_weight"] = weight
    if raw.get("tokenize_mode") == "sst":
        for task in tasks:
            task["format"] = "text"
    return {("data", "tasks"): tasks}


def _tokenize_mode(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    mode = raw["tokenize_mode"]
    if mode not in (None, "sft", "pretrain", "sst"):
        raise ValueError(f"tokenize_mode: {mode!r} is not one of 'sft', 'pretrain', 'sst'")
    if raw.get("data_paths") is None:
        raise ValueError("tokenize_mode: given without data_paths")
    if mode != "pretrain":
        return {}  # sst: the tasks' format (`_tasks`)
    # MFTCoder's encoder empties every marker in pretrain mode and trains every token.
    empty = {"system": "", "user": "", "assistant": ""}
    return {("data", "train_on"): "all", ("data", "template", "role_markers"): empty}


def _role_markers(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    if raw["role_markers"] is None or raw.get("tokenize_mode") == "pretrain":
        return {}  # pretrain mode empties the markers (`_tokenize_mode`)
    return {("data", "template", "role_markers"): raw["role_markers"]}


def _task_weights(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    if raw.get("data_paths") is None and raw.get("task_weights") is not None:
        raise ValueError("task_weights: given without data_paths")
    return {}  # folded into the tasks by `_tasks`


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


def _split(raw: Mapping[str, Any], notes: list[str]) -> Updates:
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
    total = train + valid + test
    return {("data", "valid_ratio"): valid / total, ("data", "test_ratio"): test / total}


def _seq_length(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    length = raw["seq_length"]
    if length is None:
        return {}
    if not isinstance(length, int) or isinstance(length, bool):
        raise ValueError(f"seq_length: expected a whole number, got {length!r}")
    return {("data", "max_seq_len"): length + 1}


def _method(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    peft = raw.get("peft_type")
    if peft not in (None, "lora", "qlora"):
        raise ValueError(f"peft_type: {peft!r} is not one of 'lora', 'qlora' (or null for full fine-tuning)")
    if peft is None:
        return {("finetune", "method"): "full"}
    return {("finetune", "method"): peft, ("finetune", "lora", "bias"): "lora_only"}


def _loss(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    mode = raw["weighted_loss_mode"]
    if mode == "selfpaced":
        raise ValueError(
            "weighted_loss_mode: 'selfpaced' is not offered by mftune; use 'coba' (convergence balancing) "
            "or 'case3'"
        )
    # MFTCoder normalises every mode within each micro-batch on each device: so does its config here.
    scope = {("train", "loss_scope"): "micro_batch"}
    return scope if mode is None else {("train", "loss"): mode, **scope}


def _batch(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    micro = _or_default(raw.get("per_device_train_batch_size"), 1)
    accumulation = _or_default(raw.get("gradient_accumulation_steps"), 1)
    return {("train", "global_batch_size"): micro * accumulation, ("train", "micro_batch_size"): micro}


def _min_lr(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    return {} if raw["min_lr"] is None else {("train", "min_lr"): raw["min_lr"]}


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


def _saving_limit(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    limit = raw["saving_limit"]
    if limit is None and raw.get("peft_type") is None:
        notes.append(
            f"saving_limit: null under full fine-tuning, so {_FULL_FINETUNE_SAVING_LIMIT}, as MFTCoder sets it"
        )
        limit = _FULL_FINETUNE_SAVING_LIMIT
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"saving_limit: expected a whole number from 1, or null, got {limit!r}")
    return {("train", "keep_last"): limit, ("train", "keep_best"): 1}


def _early_stopping(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    enabled = raw.get("early_stopping", True) is not False
    stall = _or_default(raw.get("early_stopping_stall_num"), MFTCODER_DEFAULTS["early_stopping_stall_num"])
    return {("train", "early_stopping", "patience"): stall if enabled else None}


def _resume(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    if raw.get("resume_from_checkpoint"):
        return {("train", "resume"): raw["resume_from_checkpoint"]}
    return {("train", "resume"): "never" if raw.get("auto_resume") is False else "auto"}


def _probe(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    batches = raw.get("coba_sample_valid_num")
    if batches is None:
        return {}
    rows = _or_default(raw.get("per_device_eval_batch_size"), MFTCODER_DEFAULTS["per_device_eval_batch_size"])
    return {("coba", "probe_batches"): batches * rows}


def _dtype(raw: Mapping[str, Any], notes: list[str]) -> Updates:
    if raw.get("bf16") and raw.get("fp16"):
        raise ValueError("bf16, fp16: both are true; choose one")
    dtype = "bfloat16" if raw.get("bf16") else "float16" if raw.get("fp16") else None
    return {} if dtype is None else {("model", "dtype"): dtype}


_CONVERTERS: dict[str, Converter] = {
    "data_paths": _tasks,
    "task_weights": _task_weights,
    "tokenize_mode": _tokenize_mode,
    "role_markers": _role_markers,
    "data_split": _split,
    "seq_length": _seq_length,
    "peft_type": _method,
    "weighted_loss_mode": _loss,
    "per_device_train_batch_size": _batch,
    "gradient_accumulation_steps": _batch,
    "min_lr": _min_lr,
    "num_warmup_steps": _warmup,
    "seed": _seed,
    "saving_limit": _saving_limit,
    "early_stopping": _early_stopping,
    "early_stopping_stall_num": _early_stopping,
    "resume_from_checkpoint": _resume,
    "auto_resume": _resume,
    "coba_sample_valid_num": _probe,
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
