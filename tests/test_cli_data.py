"""`mftune data validate` and `mftune data inspect`, end to end through `mftune.cli.main`.

Expectations are computed independently of the pipeline: record counts from the files' lines, trained text
from the records' answers, and prompt ids from `apply_chat_template` with the role-markers chat template.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml

from mftune.cli import build_parser, main
from mftune.data.templates import RoleMarkersTemplate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
MFTCODER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mftcoder_compat.json"
TASKS = ("arithmetic", "list_ops", "write_function", "write_test")
STOP = "</s>"
ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "bot": "assistant",
    "assistant": "assistant",
    "gpt": "assistant",
}


def write_config(tmp_path: Path, tokenizer_dir: Path, tasks: dict[str, Path], **data) -> Path:
    raw = {
        "model": {"name_or_path": str(tokenizer_dir)},
        "data": {
            "tasks": {name: {"path": str(path)} for name, path in tasks.items()},
            "cache_dir": str(tmp_path / "cache"),
            "max_seq_len": 256,
            "num_proc": 1,
            **data,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict[str, dict[str, str]]:
    """The rows of the table `data validate` prints, keyed by task, each column -> cell."""
    lines = out.splitlines()
    header = lines[0].split()
    rows = {}
    for line in lines[2:]:
        if not line.strip():
            break
        cells = line.split()
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def count_records(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def read_record(path: Path, line: int) -> dict:
    with path.open(encoding="utf-8") as f:
        return json.loads(f.readlines()[line - 1])


def as_messages(record: dict) -> list[dict[str, str]]:
    """A source record as OpenAI messages, written here from the formats' documentation."""
    if "chat_rounds" in record:
        return [{"role": ROLES[t["role"]], "content": t["content"]} for t in record["chat_rounds"]]
    if "messages" in record:
        return [{"role": ROLES[t["role"]], "content": t["content"]} for t in record["messages"]]
    if "conversations" in record:
        return [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    prompt = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """`[start, end)` of every run of consecutive trained positions."""
    runs: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == -100:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


@pytest.fixture(scope="module")
def examples_config(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The four bundled example tasks, with a cache shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("examples")
    return write_config(tmp, tokenizer_dir, {name: EXAMPLES / name for name in TASKS})


def test_validate_examples_counts_every_record_then_reads_the_cache(capsys, tmp_path, tokenizer_dir):
    config = write_config(tmp_path, tokenizer_dir, {n: EXAMPLES / n for n in TASKS}, num_proc=2)
    code, out, err = run(capsys, "data", "validate", config)
    assert code == 0, err
    rows = table(out)
    assert list(rows) == [*TASKS, "all"]
    for name in TASKS:
        lines = count_records(EXAMPLES / name / "train.jsonl")
        assert (rows[name]["records"], rows[name]["kept"], rows[name]["errors"]) == (
            str(lines),
            str(lines),
            "0",
        )
    total = sum(count_records(EXAMPLES / n / "train.jsonl") for n in TASKS)
    assert rows["all"]["records"] == rows["all"]["kept"] == str(total)
    assert "no errors" in out and "from cache" not in out

    code, again, _ = run(capsys, "data", "validate", config)
    assert code == 0
    assert f"from cache ({tmp_path / 'cache'}): {', '.join(TASKS)}" in again
    assert table(again) == rows


BAD_LINES = [
    '{"messages": [{"role": "user", "content": "ok?"}, {"role": "assistant", "content": "yes"}]}',
    '{"messages": [{"role": "user", "content": "cut off"',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}',
    '{"messages": [{"role": "user", "content": "fine?"}, {"role": "assistant", "content": "yes"}]}',
    '{"prompt": "another format in a messages file", "answer": "a"}',
]


def test_bad_records_fail_with_file_line_and_field_or_are_skipped(capsys, tmp_path, tokenizer_dir):
    folder = tmp_path / "bad"
    folder.mkdir()
    data_file = folder / "train.jsonl"
    data_file.write_text("\n".join(BAD_LINES) + "\n", encoding="utf-8")
    config = write_config(tmp_path, tokenizer_dir, {"bad": folder})

    code, out, err = run(capsys, "data", "validate", config)
    assert code == 1
    assert "4 bad record(s)" in err
    assert f"{data_file}:2: invalid JSON" in err
    assert f"{data_file}:3: field 'messages[1].role': unknown role 'robot'" in err
    assert f"{data_file}:4: field 'messages[1].content'" in err
    assert f"{data_file}:6: field 'messages': missing" in err
    assert f"{data_file}:1:" not in err and f"{data_file}:5:" not in err
    assert (table(out)["bad"]["records"], table(out)["bad"]["errors"], table(out)["bad"]["kept"]) == (
        "6",
        "4",
        "2",
    )

    code, out, err = run(capsys, "data", "validate", config, "data.on_error=skip")
    assert code == 0
    assert table(out)["bad"]["errors"] == "4" and table(out)["bad"]["kept"] == "2"
    assert "skip" in err


def test_a_task_with_only_bad_records_is_reported_not_a_crash(capsys, tmp_path, tokenizer_dir):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "train.jsonl").write_text("{oops\n" + '{"messages": 3}\n', encoding="utf-8")
    code, out, err = run(
        capsys, "data", "validate", write_config(tmp_path, tokenizer_dir, {"broken": folder})
    )
    assert code == 1
    assert table(out)["broken"]["errors"] == "2"
    assert "train.jsonl:1: invalid JSON" in err and "train.jsonl:2: field 'messages'" in err


def test_a_typo_in_an_override_exits_2_with_the_suggestion(capsys, examples_config):
    code, out, err = run(capsys, "data", "validate", examples_config, "data.max_seq_length=512")
    assert code == 2 and out == ""
    assert "data.max_seq_length" in err and "did you mean 'data.max_seq_len'" in err


def test_inspect_marks_the_answer_and_its_stop_token(capsys, examples_config):
    index = 7
    record = read_record(EXAMPLES / "write_test" / "train.jsonl", index + 1)
    code, out, err = run(
        capsys,
        "data",
        "inspect",
        examples_config,
        "--task",
        "write_test",
        "--index",
        index,
        "--color",
        "never",
    )
    assert code == 0, err
    assert f"train.jsonl:{index + 1})" in out
    body = out.split("\n\n", 1)[1]  # the sample, after the header lines
    assert f"⟦{record['output']}\n{STOP}⟧" in body  # MFTCoder's format: the answer's newline is trained
    assert body.count("⟦") == 1
    assert "\x1b[" not in out


def test_inspect_marks_every_assistant_turn_of_a_conversation(capsys, examples_config):
    path = EXAMPLES / "arithmetic" / "train.jsonl"
    # The first multi-turn record, found from the file itself.
    index = next(i for i in range(count_records(path)) if len(read_record(path, i + 1)["chat_rounds"]) > 3)
    answers = [t["content"] for t in read_record(path, index + 1)["chat_rounds"] if t["role"] == "bot"]
    code, out, _ = run(
        capsys,
        "data",
        "inspect",
        examples_config,
        "--task",
        "arithmetic",
        "--index",
        index,
        "--color",
        "never",
    )
    assert code == 0
    body = out.split("\n\n", 1)[1]
    assert body.count("⟦") == len(answers) > 1
    for answer in answers:
        assert f"⟦{answer}\n{STOP}⟧" in body


@pytest.mark.parametrize("index", [250, -1])
def test_inspect_index_out_of_range_exits_2(capsys, examples_config, index):
    code, out, err = run(capsys, "data", "inspect", examples_config, "--task", "write_test", "--index", index)
    assert code == 2 and out == ""
    assert "[0, 250)" in err


def test_inspect_unknown_task_exits_2_listing_the_tasks(capsys, examples_config):
    code, _, err = run(capsys, "data", "inspect", examples_config, "--task", "write_tests")
    assert code == 2
    assert "write_tests" in err
    for name in TASKS:
        assert name in err


def test_dump_trains_exactly_the_answers_on_the_ids_inference_sees(
    capsys, tmp_path, examples_config, tokenizer
):
    dump = tmp_path / "samples.jsonl"
    code, out, err = run(capsys, "data", "inspect", examples_config, "--dump", dump)
    assert code == 0, err
    samples = [json.loads(line) for line in dump.read_text(encoding="utf-8").splitlines()]
    expected_count = sum(count_records(EXAMPLES / n / "train.jsonl") for n in TASKS)
    assert len(samples) == expected_count
    assert f"wrote {expected_count} samples" in out
    assert {s["task"] for s in samples} == set(TASKS)

    chat_template = RoleMarkersTemplate("<s>system\n", "<s>human\n", "<s>bot\n", STOP).chat_template()
    for sample in samples:
        ids, labels = sample["input_ids"], sample["labels"]
        assert len(labels) == len(ids) <= 256
        assert all(label in (-100, token) for label, token in zip(labels, ids, strict=True))

        file, line = sample["source"].rsplit(":", 1)
        assert Path(file).parent.name == sample["task"]
        messages = as_messages(read_record(Path(file), int(line)))
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        runs = trained_runs(labels)
        decoded = [
            tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for a, b in runs
        ]
        assert decoded == [messages[i]["content"] + "\n" + STOP for i in turns], sample["source"]

        # Each answer starts right after the ids of its prompt as inference tokenizes it.
        for (start, _), turn in zip(runs, turns, strict=True):
            prompt = tokenizer.apply_chat_template(
                messages[:turn], chat_template=chat_template, add_generation_prompt=True, tokenize=False
            )
            assert ids[:start] == tokenizer(prompt)["input_ids"], sample["source"]
        full = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
        if "instruction" in read_record(Path(file), int(line)):
            full = full.removesuffix(
                "\n"
            )  # MFTCoder writes nothing after a prompt/answer record's stop token
        assert sample["text"] == full
        assert ids == tokenizer(full)["input_ids"]


def test_dump_of_one_task(capsys, tmp_path, examples_config):
    dump = tmp_path / "one.jsonl"
    code, _, _ = run(capsys, "data", "inspect", examples_config, "--task", "write_test", "--dump", dump)
    assert code == 0
    tasks = [json.loads(line)["task"] for line in dump.read_text(encoding="utf-8").splitlines()]
    assert tasks == ["write_test"] * count_records(EXAMPLES / "write_test" / "train.jsonl")


def test_the_mftcoder_config_validates(capsys, tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.chdir(
        tmp_path
    )  # an MFTCoder config's relative paths, the cache's too, are the working folder's
    raw = json.loads(MFTCODER_CONFIG.read_text(encoding="utf-8"))
    paths = ",".join(str(EXAMPLES / name) for name in TASKS)
    raw.update(
        data_paths=f"[{paths}]",
        pretrained_model_path=str(tokenizer_dir),
        output_dir=str(tmp_path / "run"),
        tb_dir=str(tmp_path / "run" / "tensorboard"),
    )
    config = tmp_path / "mftcoder.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    code, out, err = run(capsys, "data", "validate", config)
    assert code == 0, err
    rows = table(out)
    assert list(rows) == [*TASKS, "all"]
    train_share, valid_share, test_share = (int(x) for x in raw["data_split"].split(","))
    for name in TASKS:
        records = count_records(EXAMPLES / name / "train.jsonl")
        assert rows[name]["kept"] == str(records)
        # data_split "90,10,0" holds out 10% of each task.
        valid = round(records * valid_share / (train_share + valid_share + test_share))
        assert rows[name]["valid"] == str(valid)
    # padding_mode "padding" is mftune's packing none: no fill ratio.
    assert rows["all"]["fill"] == "-"
    assert "no errors" in out
    assert (tmp_path / ".mftune_cache").is_dir()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Each argument as its longest option string (or positional name), with its choices if closed."""
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        name = max(action.option_strings, key=len) if action.option_strings else action.dest
        out.add(f"{name} {{{','.join(action.choices)}}}" if action.choices else name)
    return out


def test_the_data_command_line_surface_is_pinned():
    top = _subcommands(build_parser())
    assert "data" in top
    data = _subcommands(top["data"])
    assert {"validate", "inspect"} <= set(data)
    assert not _subcommands(data["validate"]) and not _subcommands(data["inspect"])
    assert _options(data["validate"]) == {"--help", "config", "overrides"}
    assert _options(data["inspect"]) == {
        "--help",
        "config",
        "overrides",
        "--task",
        "--index",
        "--dump",
        "--dump-rows",
        "--epoch",
        "--color {auto,always,never}",
    }
    assert data["inspect"].get_default("index") == 0
    assert data["inspect"].get_default("color") == "auto"


def test_validate_accepts_a_task_given_as_one_file(capsys, tmp_path, tokenizer_dir):
    single = tmp_path / "list_ops.jsonl"
    shutil.copy(EXAMPLES / "list_ops" / "train.jsonl", single)
    code, out, _ = run(capsys, "data", "validate", write_config(tmp_path, tokenizer_dir, {"ops": single}))
    assert code == 0
    assert table(out)["ops"]["kept"] == str(count_records(single))


def _rows_and_samples(capsys, tmp_path, config) -> tuple[list[dict], dict[str, dict]]:
    """The dumped rows of epoch 0 and the dumped samples by source."""
    rows_path, samples_path = tmp_path / "rows.jsonl", tmp_path / "samples.jsonl"
    code, out, err = run(capsys, "data", "inspect", config, "--dump-rows", rows_path)
    assert code == 0, err
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert f"wrote {len(rows)} rows of epoch 0" in out
    assert run(capsys, "data", "inspect", config, "--dump", samples_path)[0] == 0
    samples = {s["source"]: s for s in map(json.loads, samples_path.read_text().splitlines())}
    return rows, samples


def test_dump_rows_under_sequential_packing_keeps_samples_whole(capsys, tmp_path, tokenizer_dir):
    """MFTCoder's pack: every row is whole samples laid end to end, and a row closes only when the next sample
    would not fit in it."""
    config = write_config(tmp_path, tokenizer_dir, {t: EXAMPLES / t for t in TASKS}, packing="sequential")
    rows, samples = _rows_and_samples(capsys, tmp_path, config)
    lengths = []
    for row in rows:
        ids, offset = [], 0
        for piece in row["pieces"]:
            sample = samples[piece["source"]]
            assert piece["start"] == 0 and piece["end"] == len(sample["input_ids"])  # whole
            assert piece["offset"] == offset and piece["task"] == sample["task"]
            ids += sample["input_ids"]
            offset = len(ids)
        assert row["input_ids"] == ids and len(ids) <= 256
        lengths.append((len(ids), len(samples[row["pieces"][0]["source"]]["input_ids"])))
    for (used, _), (_, next_first) in itertools.pairwise(lengths):
        assert used + next_first > 256
    # One epoch trains every training sample once: all of them but the validation split.
    _, out, _ = run(capsys, "data", "validate", config)
    assert sum(len(r["pieces"]) for r in rows) == len(samples) - int(table(out)["all"]["valid"])


def test_dump_rows_under_contiguous_packing_overlaps_windows_by_one(capsys, tmp_path, tokenizer_dir):
    """MFTCoder's concat: the stream of samples cut into windows of max_seq_len tokens, each starting on the
    last token of the one before."""
    config = write_config(tmp_path, tokenizer_dir, {"list_ops": EXAMPLES / "list_ops"}, packing="contiguous")
    rows, samples = _rows_and_samples(capsys, tmp_path, config)
    stream = []
    for row in rows:
        window = [t for p in row["pieces"] for t in samples[p["source"]]["input_ids"][p["start"] : p["end"]]]
        assert row["input_ids"] == window
        if stream:
            assert window[0] == stream[-1]
            stream += window[1:]
        else:
            stream = window
    assert all(len(r["input_ids"]) == 256 for r in rows[:-1])
    # The stream is the samples laid end to end, in the order they come.
    order = dict.fromkeys(p["source"] for r in rows for p in r["pieces"])
    assert stream == [t for source in order for t in samples[source]["input_ids"]]
