"""Config errors: `ConfigError`, and pydantic validation errors rewritten one per line by dotted path."""

from __future__ import annotations

import difflib
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

_FIELD_ERROR = "config_field"


class ConfigError(Exception):
    """A config that cannot be read, does not validate, or names something that is not there; the message
    is one line that says where and why (and, where it can, what to do)."""


class MissingPackageError(ImportError):
    """A setting that needs an optional package which is not installed; the message names the package."""


def unloadable(key: str, name: str, err: Exception) -> ConfigError:
    """The one-line error for a model or tokenizer named by `key` that cannot be loaded.

    Args:
        key: the config key, e.g. `model.name_or_path`.
        name: its value, a local folder or a hub name (`org/model`).
        err: what transformers raised.
    """
    import os
    from pathlib import Path

    if name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists():
        where = f"{name} is not a model folder" if Path(name).exists() else f"{name} does not exist"
        return ConfigError(f"{key}: {where} (build or download it first, or give a Hugging Face Hub name)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    reason = (
        "the Hugging Face Hub is offline (HF_HUB_OFFLINE)" if offline else str(err).strip().splitlines()[0]
    )
    return ConfigError(f"{key}: cannot load '{name}': it is not a local folder, and {reason}")


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error about one field, raised from a section's validator (whose location is the section).

    Args:
        field: the field (or mapping key) inside the section that is wrong.
        message: what is wrong.
    """
    return PydanticCustomError(_FIELD_ERROR, message, {"field": field})


def describe_errors(err: ValidationError, root: type[BaseModel]) -> list[str]:
    """One human-readable line per error of `err`, validated against the schema `root`."""
    lines = []
    for item in err.errors(include_url=False):
        path, owner = _walk(item["loc"], root)
        lines.append(_describe(item, path, owner))
    return list(dict.fromkeys(lines))


def _describe(item: Any, path: list[str], owner: type[BaseModel] | None) -> str:
    kind, ctx, value = item["type"], item.get("ctx") or {}, item.get("input")
    dotted = ".".join(path) or "(top level)"
    if kind == "extra_forbidden":
        return _unknown_key(path, owner)
    if kind == "missing":
        return f"{dotted}: required, but missing"
    if kind == _FIELD_ERROR:
        return f"{'.'.join([*path, str(ctx['field'])])}: {item['msg']}"
    if kind == "literal_error":
        return f"{dotted}: {_short(value)} is not allowed (allowed values: {ctx['expected']})"
    message = item["msg"].removeprefix("Value error, ")
    return f"{dotted}: {message[0].lower()}{message[1:]} (got {_short(value)})"


def _unknown_key(path: list[str], owner: type[BaseModel] | None) -> str:
    *parent, key = path
    prefix = "".join(f"{part}." for part in parent)
    valid = list(owner.model_fields) if owner else []
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        return f"unknown key '{prefix}{key}' — did you mean '{prefix}{match[0]}'?"
    return f"unknown key '{prefix}{key}' (valid keys here: {', '.join(valid)})"


def _walk(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[list[str], type[BaseModel] | None]:
    """Follow an error location through the schema.

    Returns the dotted path's parts (without pydantic's union-member tags) and the section that owns
    the last key, so that an unknown key can be compared with its valid siblings.
    """
    path: list[str] = []
    node: Any = root
    owner: type[BaseModel] | None = None
    for item in loc:
        node = _unwrap_optional(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            owner = node
            field = node.model_fields.get(str(item))
            node = field.annotation if field else None
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        elif get_origin(node) is list:
            node = get_args(node)[0]
        elif _is_union(node):
            node = None
            continue  # a union-member tag such as "list[str]", not a key
        else:
            node = None
        path.append(str(item))
    return path, owner


def _unwrap_optional(node: Any) -> Any:
    if _is_union(node):
        members = [arg for arg in get_args(node) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return node


def _is_union(node: Any) -> bool:
    return get_origin(node) in (Union, types.UnionType)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
