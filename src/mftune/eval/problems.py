"""Evaluation records: problems with an expected answer, or code problems with tests.

Kinds, told apart by their fields:

- `humaneval`: `task_id`, `prompt` (a function signature and docstring), `test` (defines `check`),
  `entry_point`, optional `canonical_solution`;
- `mbpp`: `text` or `prompt`, `test_list` (assert lines), optional `test_setup_code`, `task_id`, `code`;
- `chat_tests`: a conversation in any training format, plus `tests` (a string or a list of lines) run
  after the program;
- `answer`: a conversation plus `answer`, or a conversation whose last turn is the assistant's (that turn
  is then the answer). A bare `prompt` string is one user turn.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mftune.data.formats import RecordError, detect_format, parse_record
from mftune.data.reader import DataError, decode_item, find_data_files, read_raw

Kind = Literal["answer", "humaneval", "mbpp", "chat_tests"]
CODE_KINDS = ("humaneval", "mbpp", "chat_tests")


@dataclass(frozen=True)
class Problem:
    """One evaluation record, as the metrics need it.

    Attributes:
        task: The eval task it belongs to.
        id: Its `task_id`, or `file:line`.
        source: `file:line` of the record.
        kind: See the module docstring.
        messages: The conversation up to the reply (chat records), else None.
        prompt: HumanEval's prompt or MBPP's text, else None.
        answer: The expected reply (exact match), else None.
        tests: The test code run after the program (HumanEval: `test` then `check(entry_point)`).
        entry_point: HumanEval's function name.
        test_list: MBPP's assert lines, for the `{tests}` of an instruction.
        setup: MBPP's `test_setup_code`, run before the program.
        reference: A known-good solution (`canonical_solution`, MBPP's `code`), when given.
    """

    task: str
    id: str
    source: str
    kind: Kind
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    answer: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    test_list: tuple[str, ...] = ()
    setup: str = ""
    reference: str | None = None


class ProblemError(ValueError):
    """Records that cannot be evaluated: every one, one per line, each naming file, line and field."""

    def __init__(self, errors: list[DataError]):
        self.errors = errors
        shown = "\n  ".join(str(e) for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"{len(errors)} record(s) cannot be evaluated:\n  {shown}{more}")


def read_problems(task: str, path: str | Path, limit: int | None = None) -> list[Problem]:
    """The problems of a `.jsonl`, `.json` or `.jsonl.gz` file, or of every data file under a folder.

    Raises:
        FileNotFoundError: Nothing to read at `path`.
        ProblemError: Some records cannot be evaluated (all of them are listed).
    """
    path = Path(path)
    files = [path] if path.name.endswith(".jsonl.gz") else find_data_files(path)
    problems, errors = [], []
    for file in files:
        try:
            items = _items(file)
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:  # gzip, UTF-8, JSON list errors
            raise FileNotFoundError(f"eval task {task}: cannot read {file}: {err}") from None
        for line, item in items:
            where = f"{file}:{line}"
            try:
                problems.append(parse_problem(task, decode_item(item), where))
            except RecordError as err:
                errors.append(DataError(str(file), line, err.field, err.reason))
            if limit is not None and len(problems) >= limit:
                break
        if limit is not None and len(problems) >= limit:
            break
    if errors:
        raise ProblemError(errors)
    if not problems:
        raise FileNotFoundError(f"eval task {task}: no records in {path}")
    return problems


def _items(file: Path) -> list[tuple[int, Any]]:
    if file.name.endswith(".gz"):
        with gzip.open(file, "rt", encoding="utf-8") as f:
            return [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    return read_raw(file)


def parse_problem(task: str, record: Any, where: str) -> Problem:
    """One record as a `Problem`.

    Raises:
        RecordError: The record has none of the fields of a kind, or a field of the wrong type.
    """
    if not isinstance(record, dict):
        raise RecordError(None, f"expected a JSON object, got {type(record).__name__}")
    ident = str(record.get("task_id", where))
    if "entry_point" in record or "test" in record:
        prompt, test, entry = (_text(record, key) for key in ("prompt", "test", "entry_point"))
        return Problem(
            task, ident, where, "humaneval",
            prompt=prompt,
            tests=f"{test}\n\ncheck({entry})\n",
            entry_point=entry,
            reference=_optional_text(record, "canonical_solution"),
        )  # fmt: skip
    if "test_list" in record:
        lines = record["test_list"]
        if not isinstance(lines, list) or not lines or not all(isinstance(t, str) for t in lines):
            raise RecordError("test_list", "must be a non-empty list of strings (assert lines)")
        text = _text(record, "text") if "text" in record else _text(record, "prompt")
        setup = _optional_text(record, "test_setup_code") or ""
        return Problem(
            task, ident, where, "mbpp",
            prompt=text,
            tests="\n".join(lines) + "\n",
            test_list=tuple(lines),
            setup=setup,
            reference=_optional_text(record, "code"),
        )  # fmt: skip
    messages, last_reply = _conversation(record)
    if "tests" in record:
        tests = record["tests"]
        if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
            tests = "\n".join(tests)
        if not isinstance(tests, str) or not tests.strip():
            raise RecordError("tests", "must be test code: a non-empty string or list of lines")
        return Problem(task, ident, where, "chat_tests", messages=messages, tests=tests + "\n")
    answer = _optional_text(record, "answer")
    if answer is None:
        answer = last_reply
    if answer is None:
        raise RecordError(
            "answer",
            "missing: a record needs an answer (or a final assistant turn) for exact match, or tests "
            "(tests, test_list, or HumanEval's test and entry_point) for pass@k",
        )
    return Problem(task, ident, where, "answer", messages=messages, answer=answer)


def _conversation(record: dict) -> tuple[tuple[dict[str, str], ...], str | None]:
    """The turns before the reply, and the final assistant turn's content when the record ends with one."""
    if isinstance(record.get("prompt"), str) and detect_format(record) is None:
        return ({"role": "user", "content": record["prompt"]},), None
    fmt = detect_format(record)
    if fmt is None or fmt == "text":
        raise RecordError(
            "messages",
            "no conversation: expected messages, chat_rounds, conversations, instruction or prompt",
        )
    try:
        turns = list(parse_record(record, fmt).as_messages())
    except RecordError:
        if fmt != "messages":
            raise
        # A prompt that ends with the user's turn is what an eval record is; training records need a reply.
        turns = _bare_messages(record)
    reply = None
    if turns and turns[-1]["role"] == "assistant":
        reply = turns.pop()["content"]
    if not turns or turns[-1]["role"] != "user":
        raise RecordError("messages", "the conversation must end with a user turn (before the answer)")
    return tuple(turns), reply


def _bare_messages(record: dict) -> list[dict[str, str]]:
    messages = record["messages"]
    for i, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
        ):
            raise RecordError(f"messages[{i}]", "needs a role (system, user, assistant) and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(key, "missing or not a non-empty string")
    return value


def _optional_text(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(key, f"must be a string, got {type(value).__name__}")
    return value


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write `rows` as JSON lines (UTF-8, one object per line)."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
