"""Tokenize a task's files once, with several processes, and keep the result on disk.

A task's cache lives in `<cache_dir>/<task>-<fingerprint>/` as memory-mapped NumPy arrays. The fingerprint
covers the files' bytes, the tokenizer, the template and the length policy, so any change rebuilds and
nothing stale is ever read. It is written to a temporary folder and renamed, so a killed build leaves
no half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mftune.data.formats import RecordError, parse_record
from mftune.data.reader import (
    DataError,
    decode_item,
    detect_file_format,
    find_data_files,
    iter_errors_for_undetected,
    read_raw,
)
from mftune.data.templates import Template, render
from mftune.data.tokenize import SampleDropped, tokenize_rendered

CACHE_VERSION = "3"  # 3: the special tokens and the template's date in the key
_CHUNK = 1000
_ARRAYS = ("input_ids", "trained", "offsets", "sources")


@dataclass
class TokenizedTask:
    """All kept samples of one task, concatenated.

    Attributes:
        input_ids: int32 (total_tokens,).
        trained: bool (total_tokens,).
        offsets: int64 (num_samples + 1,): sample i is `[offsets[i], offsets[i+1])`.
        sources: int64 (num_samples, 2): (index into `files`, line) of each sample.
        files: the task's data files.
        counts: records, kept, errors, overlong, truncated, no_trained_tokens.
        errors: every bad record.
    """

    name: str
    input_ids: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    sources: np.ndarray
    files: list[str]
    counts: dict[str, int]
    errors: list[DataError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 (num_samples,) tokens per sample."""
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and trained mask of sample `i`."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:end], self.trained[start:end]

    def source(self, i: int) -> str:
        """`file:line` of sample `i`."""
        file_index, line = self.sources[i]
        return f"{self.files[file_index]}:{line}"


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything besides the files that decides the tokenized result."""

    tokenizer: Any
    template: Template
    stop_token: str
    max_len: int
    overlong: str
    template_kind: str
    train_on: str = "assistant"

    def fingerprint(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                "mftune needs a fast tokenizer (character offsets); this one is a slow tokenizer"
            )
        h = hashlib.sha256()
        for part in (
            CACHE_VERSION,
            backend.to_str(),
            # What tokenizer_config.json adds to the backend: the special tokens' strings (a BOS the template
            # writes as text), and every added token.
            json.dumps(self.tokenizer.special_tokens_map, sort_keys=True, default=str),
            json.dumps(
                {str(k): str(v) for k, v in self.tokenizer.added_tokens_decoder.items()}, sort_keys=True
            ),
            _template_date(self.template.chat_template()),
            self.template_kind,
            self.template.chat_template(),
            self.stop_token,
            str(self.max_len),
            self.overlong,
            self.train_on,
        ):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()


def _template_date(source: str) -> str:
    """Today, for a template that writes the date into what it renders (Llama-3.2 stamps the system turn
    with `strftime_now`): its render, and so the tokens, change with the day."""
    import datetime

    return datetime.date.today().isoformat() if "strftime_now" in source else ""


def task_fingerprint(files: list[Path], declared_format: str, settings: TokenizeSettings) -> str:
    """A hash of the files' names and bytes, the declared format and the tokenize settings."""
    h = hashlib.sha256(settings.fingerprint().encode())
    h.update(declared_format.encode())
    for path in files:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def load_or_build(
    name: str,
    path: str | Path,
    declared_format: str,
    settings: TokenizeSettings,
    cache_dir: str | Path,
    num_proc: int = 1,
    *,
    rank: int = 0,
) -> tuple[TokenizedTask, bool]:
    """The tokenized task, from the cache when its fingerprint matches, else built and saved.

    Only rank 0 builds; other ranks wait for the finished cache folder to appear.

    Returns:
        The task and whether it came from the cache.
    """
    files = find_data_files(path)
    folder = Path(cache_dir) / f"{name}-{task_fingerprint(files, declared_format, settings)}"
    if (folder / "meta.json").exists():
        return _load(folder), True
    if rank != 0:
        _wait_for(folder)
        return _load(folder), True
    task = build_task(name, files, declared_format, settings, num_proc)
    _save(task, folder)
    return task, False


def build_task(
    name: str, files: list[Path], declared_format: str, settings: TokenizeSettings, num_proc: int = 1
) -> TokenizedTask:
    """Parse, render and tokenize every record of a task's files, in order."""
    errors: list[DataError] = []
    jobs = []
    for file_index, path in enumerate(files):
        items = read_raw(path)
        fmt = detect_file_format(path, items, declared_format)
        if fmt is None:
            errors.extend(iter_errors_for_undetected(path, items))
            continue
        jobs += [(file_index, str(path), fmt, items[i : i + _CHUNK]) for i in range(0, len(items), _CHUNK)]

    if num_proc > 1 and len(jobs) > 1:
        # Spawned workers start clean: forking a process whose torch or tokenizer thread pools are already
        # running can deadlock the children.
        with mp.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=(settings,)) as pool:
            results = list(pool.imap(_tokenize_chunk, jobs))
    else:
        _init_worker(settings)
        results = [_tokenize_chunk(job) for job in jobs]

    counts: Counter[str] = Counter(errors=len(errors), records=len(errors))
    for result in results:
        counts.update(result["counts"])
        errors.extend(result["errors"])
    lengths = np.concatenate([r["lengths"] for r in results]) if results else np.zeros(0, np.int64)
    return TokenizedTask(
        name=name,
        input_ids=_concat([r["input_ids"] for r in results], np.int32),
        trained=_concat([r["trained"] for r in results], np.bool_),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        sources=np.concatenate([r["sources"] for r in results]) if results else np.zeros((0, 2), np.int64),
        files=[str(f) for f in files],
        counts={
            k: counts.get(k, 0)
            for k in ("records", "kept", "errors", "overlong", "truncated", "no_trained_tokens")
        },
        errors=sorted(errors, key=lambda e: (e.file, e.line)),
    )


_WORKER: dict[str, TokenizeSettings] = {}


def _init_worker(settings: TokenizeSettings) -> None:
    # One process per core: the tokenizer's own thread pool would only compete with the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["settings"] = settings


def _tokenize_chunk(job: tuple[int, str, str, list[tuple[int, Any]]]) -> dict[str, Any]:
    file_index, path, fmt, items = job
    s = _WORKER["settings"]
    ids, trained, lengths, sources, errors = [], [], [], [], []
    counts: Counter[str] = Counter()
    for line, item in items:
        counts["records"] += 1
        try:
            record = decode_item(item)
        except RecordError as e:
            errors.append(DataError(path, line, e.field, e.reason))
            continue
        try:
            conversation = parse_record(record, fmt)
            sample = tokenize_rendered(
                s.tokenizer, render(s.template, conversation, s.stop_token, s.train_on), s.max_len, s.overlong
            )
        except RecordError as e:
            errors.append(DataError(path, line, e.field, f"{e.reason} ({fmt} format)"))
            continue
        except SampleDropped as e:
            counts[e.reason] += 1
            if (
                e.reason != "overlong"
            ):  # an untrainable sample is an error; an over-long one is a counted drop
                errors.append(DataError(path, line, None, str(e)))
            continue
        except ValueError as e:  # a template that cannot render this record
            errors.append(DataError(path, line, None, f"cannot render: {e}"))
            continue
        counts["kept"] += 1
        counts["truncated"] += sample.truncated
        ids.append(sample.input_ids)
        trained.append(sample.trained)
        lengths.append(len(sample.input_ids))
        sources.append((file_index, line))
    counts["errors"] += len(errors)
    return {
        "input_ids": _concat(ids, np.int32),
        "trained": _concat(trained, np.bool_),
        "lengths": np.asarray(lengths, dtype=np.int64),
        "sources": np.asarray(sources, dtype=np.int64).reshape(-1, 2),
        "errors": errors,
        "counts": counts,
    }


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def _save(task: TokenizedTask, folder: Path) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key in _ARRAYS:
        np.save(tmp / f"{key}.npy", getattr(task, key))
    meta = {
        "name": task.name,
        "files": task.files,
        "counts": task.counts,
        "errors": [e.__dict__ for e in task.errors],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same cache first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> TokenizedTask:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    arrays = {key: np.load(folder / f"{key}.npy", mmap_mode="r") for key in _ARRAYS}
    return TokenizedTask(
        name=meta["name"],
        files=meta["files"],
        counts=meta["counts"],
        errors=[DataError(**e) for e in meta["errors"]],
        **arrays,
    )


def _wait_for(folder: Path, timeout_s: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (folder / "meta.json").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for rank 0 to build the data cache {folder}")
        time.sleep(1.0)
