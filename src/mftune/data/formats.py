"""Record formats: detect which one a record is in and parse it into a `Conversation`.

Every failure is a `RecordError` naming the field and the reason; the reader adds file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mftune.data.conversation import Conversation, Role, Turn

FORMATS = ("chat_rounds", "messages", "sharegpt", "alpaca", "text")

# Role names accepted in each conversation format, mapped to mftune's three roles.
ROLE_ALIASES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "bot": "assistant",
    "assistant": "assistant",
    "gpt": "assistant",
}

# Single-turn pairs (prompt key, answer key), tried in order after alpaca's instruction/output. MFTCoder's
# encoder reads the same pairs (instruction/response and question/response among them).
QA_PAIRS = (
    ("prompt", "answer"),
    ("prompt", "response"),
    ("prompt", "completion"),
    ("instruction", "response"),
    ("question", "answer"),
    ("question", "response"),
    ("query", "answer"),
    ("input", "output"),
)


class RecordError(ValueError):
    """A record that does not fit its format: `field` is a path inside the record such as `messages[2].role`."""

    def __init__(self, field: str | None, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"field '{field}': {reason}" if field else reason)


def detect_format(record: Any) -> str | None:
    """The format a record looks like, from its keys; None if it fits none."""
    if not isinstance(record, Mapping):
        return None
    if "chat_rounds" in record:
        return "chat_rounds"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if any(p in record and a in record for p, a in QA_PAIRS):
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def parse_record(record: Any, fmt: str) -> Conversation:
    """Parse one record in format `fmt` into a validated `Conversation`.

    Raises:
        RecordError: the record does not fit `fmt` or breaks its rules.
    """
    if not isinstance(record, Mapping):
        raise RecordError(None, f"expected a JSON object, got {type(record).__name__}")
    try:
        parser = _PARSERS[fmt]
    except KeyError:
        raise RecordError(None, f"unknown format '{fmt}' (expected one of {', '.join(FORMATS)})") from None
    turns = parser(record)
    if fmt != "text":
        _check_turn_order(turns, _TURN_FIELD[fmt])
    return Conversation(turns=tuple(turns), record=dict(record), source_format=fmt)


def _parse_turn_list(record: Mapping, key: str, role_key: str, content_key: str) -> list[Turn]:
    if key not in record:
        raise RecordError(key, "missing")
    items = record[key]
    if not isinstance(items, list) or not items:
        raise RecordError(key, "expected a non-empty list of turns")
    turns = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            raise RecordError(where, f"expected an object with '{role_key}' and '{content_key}'")
        if role_key not in item:
            raise RecordError(f"{where}.{role_key}", "missing")
        raw_role = item[role_key]
        role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            allowed = ", ".join(ROLE_ALIASES)
            raise RecordError(f"{where}.{role_key}", f"unknown role {raw_role!r} (expected one of {allowed})")
        content = item.get(content_key)
        if not isinstance(content, str):
            got = "missing" if content_key not in item else f"a {type(content).__name__}"
            raise RecordError(f"{where}.{content_key}", f"expected a string, got {got}")
        turns.append(Turn(role=role, content=content))
    return turns


def _parse_chat_rounds(record: Mapping) -> list[Turn]:
    return _parse_turn_list(record, "chat_rounds", "role", "content")


def _parse_messages(record: Mapping) -> list[Turn]:
    return _parse_turn_list(record, "messages", "role", "content")


def _parse_sharegpt(record: Mapping) -> list[Turn]:
    return _parse_turn_list(record, "conversations", "from", "value")


def _string_field(record: Mapping, key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in record else f"a {type(value).__name__}"
        raise RecordError(key, f"expected a string, got {got}")
    return value


def _parse_alpaca(record: Mapping) -> list[Turn]:
    turns: list[Turn] = []
    system = _string_field(record, "system", required=False)
    if system:
        turns.append(Turn("system", system))
    if "instruction" in record and ("output" in record or "response" not in record):
        history = record.get("history") or []
        if not isinstance(history, list):
            raise RecordError("history", "expected a list of [prompt, answer] pairs")
        for i, pair in enumerate(history):
            if not (
                isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            ):
                raise RecordError(f"history[{i}]", "expected a [prompt, answer] pair of strings")
            turns += [Turn("user", pair[0]), Turn("assistant", pair[1])]
        prompt = _string_field(record, "instruction")
        extra = _string_field(record, "input", required=False)
        turns.append(Turn("user", f"{prompt}\n{extra}" if extra else prompt))
        turns.append(Turn("assistant", _string_field(record, "output")))
        return turns
    for prompt_key, answer_key in QA_PAIRS:
        if prompt_key in record and answer_key in record:
            turns.append(Turn("user", _string_field(record, prompt_key)))
            turns.append(Turn("assistant", _string_field(record, answer_key)))
            return turns
    pairs = ", ".join(f"{p}/{a}" for p, a in QA_PAIRS)
    raise RecordError(None, f"expected 'instruction' and 'output', or one of the pairs {pairs}")


def _parse_text(record: Mapping) -> list[Turn]:
    text = _string_field(record, "text")
    if not text.strip():
        raise RecordError("text", "empty text")
    return [Turn("text", text)]


_PARSERS: dict[str, Callable[[Mapping], list[Turn]]] = {
    "chat_rounds": _parse_chat_rounds,
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "alpaca": _parse_alpaca,
    "text": _parse_text,
}
_TURN_FIELD = {
    "chat_rounds": "chat_rounds",
    "messages": "messages",
    "sharegpt": "conversations",
    "alpaca": None,
}


def _check_turn_order(turns: list[Turn], list_field: str | None) -> None:
    """System first (optional), then user/assistant alternating, ending on a non-empty assistant turn."""

    def where(i: int) -> str | None:
        return f"{list_field}[{i}]" if list_field else None

    start = 1 if turns and turns[0].role == "system" else 0
    expected: Role = "user"
    for i in range(start, len(turns)):
        turn = turns[i]
        if turn.role != expected:
            reason = (
                "a system turn is only allowed first"
                if turn.role == "system"
                else f"roles out of order: expected a {expected} turn, got {turn.role}"
            )
            raise RecordError(where(i), reason)
        if turn.role == "assistant" and not turn.content.strip():
            raise RecordError(where(i), "empty assistant content")
        expected = "assistant" if expected == "user" else "user"
    if len(turns) == start:
        raise RecordError(list_field, "no user or assistant turn")
    if turns[-1].role != "assistant":
        raise RecordError(where(len(turns) - 1), "the conversation must end with an assistant turn")
