"""Tokenized cache, pipeline errors, packing of real tasks, and the per-task report."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from mftune.config import load_config
from mftune.data.collate import collate_rows
from mftune.data.pipeline import DataValidationError, prepare_data
from mftune.data.report import task_rows

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def write_config(tmp_path: Path, tokenizer_dir: Path, tasks: dict, **data) -> Path:
    raw = {
        "model": {"name_or_path": str(tokenizer_dir)},
        "data": {
            "tasks": tasks,
            "cache_dir": str(tmp_path / "cache"),
            "max_seq_len": 256,
            "num_proc": 1,
            **data,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


@pytest.fixture
def two_tasks(tmp_path):
    for name, n in (("big", 40), ("small", 8)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.jsonl").write_text(
            "\n".join(chat(f"{name} q{i}?", f"a{i}") for i in range(n)) + "\n"
        )
    return {"big": {"path": str(tmp_path / "big")}, "small": {"path": str(tmp_path / "small")}}


def test_cache_hit_and_invalidation(tmp_path, tokenizer, tokenizer_dir, two_tasks):
    cfg = load_config(write_config(tmp_path, tokenizer_dir, two_tasks))
    first = prepare_data(cfg, tokenizer)
    assert [t.from_cache for t in first.tasks] == [False, False]
    again = prepare_data(cfg, tokenizer)
    assert [t.from_cache for t in again.tasks] == [True, True]
    np.testing.assert_array_equal(again.tasks[0].tokenized.input_ids, first.tasks[0].tokenized.input_ids)

    # A changed file rebuilds only its task.
    with (tmp_path / "small" / "train.jsonl").open("a") as f:
        f.write(chat("new?", "yes") + "\n")
    changed = prepare_data(cfg, tokenizer)
    assert [t.from_cache for t in changed.tasks] == [True, False]
    assert len(changed.tasks[1].tokenized) == 9

    # A changed template rebuilds everything.
    markers = load_config(
        write_config(tmp_path, tokenizer_dir, two_tasks), ["data.template.role_markers.user=Question"]
    )
    assert [t.from_cache for t in prepare_data(markers, tokenizer).tasks] == [False, False]


def test_cache_invalidated_by_a_changed_tokenizer(tmp_path, tokenizer_dir, two_tasks):
    from transformers import AutoTokenizer

    cfg = load_config(write_config(tmp_path, tokenizer_dir, two_tasks))
    prepare_data(cfg, AutoTokenizer.from_pretrained(tokenizer_dir))
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["q1?"])
    rebuilt = prepare_data(cfg, other)
    assert [t.from_cache for t in rebuilt.tasks] == [False, False]


def test_several_processes_give_the_same_result(tmp_path, tokenizer, tokenizer_dir):
    tasks = {"arithmetic": {"path": str(EXAMPLES / "arithmetic")}}
    one = prepare_data(
        load_config(write_config(tmp_path, tokenizer_dir, tasks, num_proc=1, cache_dir=str(tmp_path / "a"))),
        tokenizer,
    )
    two = prepare_data(
        load_config(write_config(tmp_path, tokenizer_dir, tasks, num_proc=2, cache_dir=str(tmp_path / "b"))),
        tokenizer,
    )
    a, b = one.tasks[0].tokenized, two.tasks[0].tokenized
    assert a.counts == b.counts and a.counts["kept"] == 3000
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.trained, b.trained)
    np.testing.assert_array_equal(a.sources, b.sources)


def test_errors_listed_with_file_line_and_field_or_skipped(tmp_path, tokenizer, tokenizer_dir):
    folder = tmp_path / "t"
    folder.mkdir()
    lines = [
        chat("ok?", "yes"),
        "{broken",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": 5}]}),
        chat("fine?", "yes"),
        json.dumps({"messages": [{"role": "user", "content": "unanswered"}]}),
    ]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    tasks = {"t": {"path": str(folder)}}
    cfg = load_config(write_config(tmp_path, tokenizer_dir, tasks))
    with pytest.raises(DataValidationError) as info:
        prepare_data(cfg, tokenizer)
    found = [(Path(e.file).name, e.line, e.field) for e in info.value.errors]
    assert found == [
        ("data.jsonl", 2, None),
        ("data.jsonl", 3, "messages[1].content"),
        ("data.jsonl", 5, "messages[0]"),
    ]
    assert "data.jsonl:3: field 'messages[1].content'" in str(info.value)
    assert (
        "data.jsonl:2: invalid JSON" in str(info.value)
        and "(messages format)" not in str(info.value).split("data.jsonl:3")[0]
    )

    skipped = prepare_data(
        load_config(write_config(tmp_path, tokenizer_dir, tasks, on_error="skip")), tokenizer
    )
    counts = skipped.tasks[0].tokenized.counts
    assert (counts["records"], counts["kept"], counts["errors"]) == (5, 2, 3)


def test_overlong_samples_are_counted(tmp_path, tokenizer, tokenizer_dir):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "d.jsonl").write_text(
        "\n".join([chat("short", "a"), chat("long " * 200, "b"), chat("x", "y")]) + "\n"
    )
    tasks = {"t": {"path": str(folder)}}
    dropped = prepare_data(
        load_config(write_config(tmp_path, tokenizer_dir, tasks, max_seq_len=64)), tokenizer
    )
    assert dropped.tasks[0].tokenized.counts["overlong"] == 1
    assert len(dropped.tasks[0].tokenized) == 2
    # Truncating the long prompt leaves nothing trained: that is an error, not a silent drop.
    with pytest.raises(DataValidationError, match="no trained token left after truncation"):
        prepare_data(
            load_config(write_config(tmp_path, tokenizer_dir, tasks, max_seq_len=64, overlong="truncate")),
            tokenizer,
        )


def test_packed_rows_keep_every_token_once_with_their_task(tmp_path, tokenizer, tokenizer_dir):
    tasks = {name: {"path": str(EXAMPLES / name)} for name in ("arithmetic", "write_test")}
    data = prepare_data(load_config(write_config(tmp_path, tokenizer_dir, tasks, max_seq_len=128)), tokenizer)
    rows = data.epoch_rows(0)
    seen = []
    for row in rows:
        samples = data.row_samples(row)
        batch = collate_rows([samples], tokenizer.pad_token_id)
        assert batch["input_ids"].shape[1] <= 128
        for s in samples:
            ids, _ = data.tasks[s.task_id].tokenized.sample(s.sample_id)
            np.testing.assert_array_equal(s.input_ids, ids)
            seen.append((s.task_id, s.sample_id))
        # Positions restart at every sample; task ids travel with their tokens.
        starts = np.flatnonzero(batch["position_ids"][0].numpy() == 0)
        assert len(starts) == len(samples)
        expected_tasks = np.concatenate([np.full(len(s.input_ids), s.task_id) for s in samples])
        np.testing.assert_array_equal(batch["task_ids"][0].numpy(), expected_tasks)
    expected = [(t.task_id, int(i)) for t in data.tasks for i in t.train]
    assert sorted(seen) == sorted(expected)


def test_report_counts(tmp_path, tokenizer, tokenizer_dir, two_tasks):
    data = prepare_data(
        load_config(write_config(tmp_path, tokenizer_dir, two_tasks, valid_ratio=0.25)), tokenizer
    )
    rows = {r["task"]: r for r in task_rows(data)}
    assert rows["big"]["records"] == 40 and rows["big"]["valid"] == 10 and rows["big"]["train"] == 30
    assert rows["small"]["valid"] == 2 and rows["small"]["train"] == 6
    assert rows["all"]["per_epoch"] == 36
    tokens = sum(len(t.tokenized.input_ids) for t in data.tasks)
    assert rows["all"]["tokens"] == tokens
    assert 0 < float(rows["all"]["fill"]) <= 1


def test_valid_path_is_used_as_is(tmp_path, tokenizer, tokenizer_dir, two_tasks):
    shutil.copytree(tmp_path / "small", tmp_path / "small_valid")
    two_tasks["small"]["valid_path"] = str(tmp_path / "small_valid")
    data = prepare_data(load_config(write_config(tmp_path, tokenizer_dir, two_tasks)), tokenizer)
    small = data.tasks[1]
    assert len(small.train) == 8 and len(small.valid) == 8
    assert small.valid_tokenized is not small.tokenized
