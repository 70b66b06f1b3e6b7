"""Markdown tables documenting a pydantic config schema, one per section, from its field descriptions."""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

_BOUNDS = (
    (at.Gt, "gt", ">"),
    (at.Ge, "ge", "≥"),
    (at.Lt, "lt", "<"),
    (at.Le, "le", "≤"),
    (at.MinLen, "min_length", "length ≥"),
)


def iter_sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """Every section below `model` with its dotted path; tasks-like mappings appear as `<name>`."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub, keyed = _section_type(field.annotation)
        if sub is not None:
            section_path = f"{path}.<name>" if keyed else path
            yield section_path, sub
            yield from iter_sections(sub, f"{section_path}.")


def reference_markdown(root: type[BaseModel]) -> str:
    """A `### path` heading and a key/type/default/meaning table for every section of `root`."""
    blocks = []
    for path, section in iter_sections(root):
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in section.model_fields.items():
            cells = (f"`{path}.{name}`", _type(field), _default(field), _cell(field.description or ""))
            rows.append("| " + " | ".join(cells) + " |")
        doc = (section.__doc__ or "").strip().splitlines()[0]
        blocks.append(f"### `{path}`\n\n{doc}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(blocks)


def _section_type(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is dict:
        value = get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value, True
    return None, False


def _type(field: FieldInfo) -> str:
    label = _label(field.annotation)
    bounds = [
        f"{sign} {getattr(m, attr)}"
        for m in field.metadata
        for cls, attr, sign in _BOUNDS
        if isinstance(m, cls)
    ]
    return ", ".join([label, *bounds])


def _label(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        label = " or ".join(_label(a) for a in args if a is not type(None))
        return label + (" or `null`" if type(None) in args else "")
    if origin is list:
        return f"list of {_label(args[0])}"
    if origin is dict:
        value = "sections" if _section_type(args[1])[0] else _label(args[1])
        return f"mapping of names to {value}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "see below"
    text = json.dumps(value, ensure_ascii=False)
    # Plain strings read better unquoted; quote those with escapes (e.g. "\n") or nothing in them.
    if isinstance(value, str) and value and text[1:-1] == value:
        text = value
    return f"`{_cell(text)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
