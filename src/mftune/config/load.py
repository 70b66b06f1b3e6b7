"""Reading a config: YAML or JSON (an MFTCoder config translated first), `key.path=value` overrides,
paths made absolute, validated once against the schema; and writing it back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mftune.config.errors import ConfigError, describe_errors
from mftune.config.eval_schema import EvalConfig
from mftune.config.mftcoder import from_mftcoder, looks_like_mftcoder
from mftune.config.reference import reference_markdown
from mftune.config.schema import Config, tasks_as_dict
from mftune.config.section import Section

logger = logging.getLogger(__name__)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a config file.

    An MFTCoder train config (JSON with MFTCoder's keys) is translated first, with a warning listing
    what was mapped, what has no effect and where mftune differs. Relative paths in the file (and
    relative defaults) are resolved against the file's folder (an MFTCoder config's: against the
    working folder, as MFTCoder reads them); relative paths given in overrides, against the working
    folder.

    Args:
        path: a `.yaml`, `.yml` or `.json` file.
        overrides: `key.path=value` items; values are parsed as YAML (`3`, `true`, `[a,b]`, `null`).

    Returns:
        The validated config, with absolute local paths.

    Raises:
        ConfigError: the file cannot be read, an override is malformed, or the config is invalid.
    """
    path = Path(path)
    base = path.parent.absolute()
    raw = _read(path)
    if looks_like_mftcoder(raw):
        base = Path.cwd()  # MFTCoder reads its paths from the working folder
        try:
            raw, notes = from_mftcoder(raw)
        except ConfigError as err:
            raise ConfigError(
                f"invalid MFTCoder config {path}:\n  " + str(err).replace("\n", "\n  ")
            ) from None
        logger.warning("%s is an MFTCoder config, read as:\n  %s", path, "\n  ".join(notes))
    try:
        _resolve_raw_paths(raw, base)
        for item in overrides:
            _apply_override(raw, item)
    except ValueError as err:
        raise ConfigError(f"invalid config {path}:\n  {err}") from None
    cfg = validate_config(raw, source=str(path))
    # Defaults are relative too: anchor them like the file's own paths.
    cfg.train.output_dir = _absolute(cfg.train.output_dir, base)
    cfg.data.cache_dir = _absolute(cfg.data.cache_dir, base)
    return cfg


def validate_config(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a raw config mapping (no path resolution, no MFTCoder translation).

    Raises:
        ConfigError: every problem found, one per line, each naming its dotted path.
    """
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = describe_errors(err, Config)
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines)) from None


def eval_config_from_overrides(overrides: Sequence[str], path: str | Path | None = None) -> EvalConfig:
    """An `eval` section on its own: from a file holding only `eval:` (paths relative to it) and/or
    `eval.*` overrides, for a model evaluated without a run or a training config.

    Raises:
        ConfigError: the file holds more than `eval:`, an override is outside `eval.`, or a value is invalid.
    """
    raw: dict[str, Any] = {}
    source = str(path) if path else "overrides"
    if path is not None:
        raw = _read(Path(path))
        if set(raw) - {"eval"}:
            raise ConfigError(
                f"{path}: an eval config holds only an eval section, not {sorted(set(raw) - {'eval'})}"
            )
        _resolve_raw_paths(raw, Path(path).parent.absolute())
    try:
        for item in overrides:
            if not item.startswith("eval."):
                raise ValueError(
                    f"override {item!r}: without a run or a training config only eval.* keys apply"
                )
            _apply_override(raw, item)
    except ValueError as err:
        raise ConfigError(f"invalid {source}:\n  {err}") from None
    try:
        return _EvalOnly.model_validate({"eval": raw.get("eval", {})}).eval
    except ValidationError as err:
        lines = describe_errors(err, _EvalOnly)
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines)) from None


def is_eval_only(path: str | Path) -> bool:
    """Whether a config file holds an eval section and nothing else."""
    return set(_read(Path(path))) == {"eval"}


class _EvalOnly(Section):
    eval: EvalConfig


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML/JSON-safe data, loadable again by `load_config`."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML (e.g. a run's `resolved_config.yaml`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")


def config_reference_markdown() -> str:
    """The reference of every config key (tables per section), as written in `docs/config.md`."""
    return reference_markdown(Config)


def _read(path: Path) -> dict[str, Any]:
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: a config is a .yaml, .yml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ValueError(f"override {item!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({err})") from None
    if value is None and text.strip() not in _NULLS:
        value = text  # YAML reads `# ...` as a comment; the user meant the text
    # Paths typed on the command line are relative to where it was typed.
    tree: dict[str, Any] = {}
    _set(tree, keys, value)
    _resolve_raw_paths(tree, Path.cwd())
    node = raw
    for depth, part in enumerate(keys[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {'.'.join(keys[: depth + 1])} is not a section")
        node = child
    node[keys[-1]] = _get(tree, keys)


_NULLS = ("", "~", "null", "Null", "NULL")


def _set(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for part in keys[:-1]:
        tree = tree.setdefault(part, {})
    tree[keys[-1]] = value


def _get(tree: dict[str, Any], keys: list[str]) -> Any:
    for part in keys:
        tree = tree[part]
    return tree


# Path fields outside tasks; model names are only treated as paths when they look like one.
_PATH_FIELDS = (
    ("data", "template", "jinja_file"),
    ("data", "cache_dir"),
    ("train", "output_dir"),
    ("eval", "output_dir"),
)
_MODEL_FIELDS = (("model", "name_or_path"), ("model", "tokenizer"))


def _resolve_raw_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative paths in a raw config absolute against `base`, in place."""

    def section(*keys: str) -> dict[str, Any]:
        node: Any = raw
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    for *parents, key in _PATH_FIELDS:
        _resolve(section(*parents), key, base)
    for *parents, key in _MODEL_FIELDS:
        node = section(*parents)
        if _is_text(node.get(key)) and _is_local(node[key], base):
            _resolve(node, key, base)
    train = section("train")
    if train.get("resume") not in ("auto", "never"):
        _resolve(train, "resume", base)
    data = section("data")
    if "tasks" in data:
        try:
            data["tasks"] = tasks_as_dict(data["tasks"])
        except ValueError as err:
            raise ValueError(f"data.tasks: {err}") from None
    for task in section("data", "tasks").values():
        if isinstance(task, dict):
            _resolve(task, "path", base)
            _resolve(task, "valid_path", base)
    for task in section("eval", "tasks").values():
        if isinstance(task, dict):
            _resolve(task, "path", base)


def _resolve(node: dict[str, Any], key: str, base: Path) -> None:
    # Anything but a non-empty string is left for the schema to reject.
    if _is_text(node.get(key)):
        node[key] = _absolute(node[key], base)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _is_local(name: str, base: Path) -> bool:
    # A hub id never starts with '.', '~' or '/'; anything else is local only if the folder exists.
    return name.startswith((".", "~", "/")) or (base / name).is_dir()


def _absolute(path: str, base: Path) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))
