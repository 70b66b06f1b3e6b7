"""Find a task's data files and read their records with file and line attached."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mftune.data.formats import FORMATS, RecordError, detect_format

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class DataError:
    """One bad record: where it is and what is wrong with it."""

    file: str
    line: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: field '{self.field}': {self.reason}" if self.field else f"{where}: {self.reason}"


def find_data_files(path: str | Path) -> list[Path]:
    """The data files of a task: `path` itself, or every .jsonl/.json/.parquet file under it, sorted.

    Raises:
        FileNotFoundError: the path does not exist or holds no data file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"task data path does not exist: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(DATA_SUFFIXES)} files under {path}")
    return files


def read_raw(path: Path) -> list[tuple[int, Any]]:
    """(line number, raw item) pairs of one file; jsonl items are unparsed strings, parsed lazily by workers.

    For a .json file holding a list, "line" is the 1-based index of the item; for parquet, the row number.
    """
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
        items = data if isinstance(data, list) else [data]
        return list(enumerate(items, start=1))
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading parquet needs pyarrow: pip install 'mftune[parquet]'") from e
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    raise ValueError(f"{path}: unsupported file type (expected {', '.join(DATA_SUFFIXES)})")


def decode_item(item: Any) -> Any:
    """A raw jsonl line parsed to a record; other items pass through.

    Raises:
        RecordError: the line is not valid JSON.
    """
    if not isinstance(item, str):
        return item
    try:
        # Without its line break, a truncated line's error points into the line, not past its end.
        return json.loads(item.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise RecordError(None, f"invalid JSON: {e.msg} at column {e.colno}") from None


def detect_file_format(path: Path, items: list[tuple[int, Any]], declared: str) -> str | None:
    """The format of a file: the declared one, or the format of its first record that fits one."""
    if declared != "auto":
        if declared not in FORMATS:
            raise ValueError(f"unknown format '{declared}' (expected auto or one of {', '.join(FORMATS)})")
        return declared
    for _, item in items:
        try:
            fmt = detect_format(decode_item(item))
        except RecordError:
            continue
        if fmt:
            return fmt
    return None


def iter_errors_for_undetected(path: Path, items: list[tuple[int, Any]]) -> Iterator[DataError]:
    """One error per record of a file in which no record fits any format."""
    for line, item in items:
        try:
            record = decode_item(item)
        except RecordError as e:
            yield DataError(str(path), line, None, e.reason)
            continue
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        yield DataError(
            str(path),
            line,
            None,
            f"fits no format (keys: {keys}); expected chat_rounds, messages, conversations, "
            "instruction/output, a prompt/answer pair, or text",
        )
