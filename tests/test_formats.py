"""Formats: detection, parsing into turns, and the errors bad records get."""

import json

import pytest

from mftune.data.conversation import Turn
from mftune.data.formats import RecordError, detect_format, parse_record
from mftune.data.reader import decode_item, detect_file_format, find_data_files, read_raw


def turns(*pairs):
    return tuple(Turn(role, content) for role, content in pairs)


def test_chat_rounds_with_system_and_two_rounds():
    record = {
        "id": 7,
        "data_name": "x",
        "chat_rounds": [
            {"role": "system", "content": "S"},
            {"role": "human", "content": "Q1"},
            {"role": "bot", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2", "chat_round_id": 2},
        ],
    }
    assert detect_format(record) == "chat_rounds"
    conv = parse_record(record, "chat_rounds")
    assert conv.turns == turns(
        ("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")
    )
    assert conv.record["id"] == 7


def test_messages_and_sharegpt():
    messages = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    assert detect_format(messages) == "messages"
    assert detect_format(sharegpt) == "sharegpt"
    assert parse_record(messages, "messages").turns == turns(("user", "Q"), ("assistant", "A"))
    assert parse_record(sharegpt, "sharegpt").turns == turns(
        ("system", "S"), ("user", "Q"), ("assistant", "A")
    )


def test_alpaca_with_input_system_and_history():
    record = {
        "system": "S",
        "history": [["h1", "a1"]],
        "instruction": "Do it",
        "input": "data",
        "output": "done",
    }
    assert detect_format(record) == "alpaca"
    assert parse_record(record, "alpaca").turns == turns(
        ("system", "S"), ("user", "h1"), ("assistant", "a1"), ("user", "Do it\ndata"), ("assistant", "done")
    )
    assert parse_record({"instruction": "Do", "input": "", "output": "ok"}, "alpaca").turns == turns(
        ("user", "Do"), ("assistant", "ok")
    )


@pytest.mark.parametrize(
    ("prompt_key", "answer_key"),
    [("prompt", "response"), ("question", "answer"), ("query", "answer"), ("input", "output")],
)
def test_single_turn_pairs(prompt_key, answer_key):
    record = {prompt_key: "P", answer_key: "R"}
    assert detect_format(record) == "alpaca"
    assert parse_record(record, "alpaca").turns == turns(("user", "P"), ("assistant", "R"))


def test_text():
    assert detect_format({"text": "abc"}) == "text"
    assert parse_record({"text": "abc"}, "text").turns == turns(("text", "abc"))


@pytest.mark.parametrize(
    ("record", "fmt", "field", "reason"),
    [
        (
            {"chat_rounds": [{"role": "human", "content": "Q"}, {"role": "assitant", "content": "A"}]},
            "chat_rounds",
            "chat_rounds[1].role",
            "unknown role 'assitant'",
        ),
        (
            {"messages": [{"role": "assistant", "content": "A"}]},
            "messages",
            "messages[0]",
            "expected a user turn",
        ),
        (
            {"messages": [{"role": "user", "content": "Q"}]},
            "messages",
            "messages[0]",
            "must end with an assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]},
            "messages",
            "messages[1]",
            "empty assistant content",
        ),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 3}]},
            "messages",
            "messages[1].content",
            "expected a string, got a int",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "system", "content": "S"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "messages",
            "messages[1]",
            "only allowed first",
        ),
        (
            {"conversations": [{"from": "human"}, {"from": "gpt", "value": "A"}]},
            "sharegpt",
            "conversations[0].value",
            "got missing",
        ),
        ({"messages": []}, "messages", "messages", "non-empty list"),
        ({"instruction": "Do"}, "alpaca", "output", "got missing"),
        ({"instruction": "Do", "output": "x", "history": [["only one"]]}, "alpaca", "history[0]", "pair"),
        ({"text": ""}, "text", "text", "empty text"),
    ],
)
def test_bad_records_name_field_and_reason(record, fmt, field, reason):
    with pytest.raises(RecordError) as info:
        parse_record(record, fmt)
    assert info.value.field == field
    assert reason in info.value.reason


def test_reader_finds_files_recursively_and_keeps_line_numbers(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    (tmp_path / "a.json").write_text(json.dumps([{"text": "z"}]))
    (tmp_path / "notes.txt").write_text("ignored")
    files = find_data_files(tmp_path)
    assert [f.name for f in files] == ["a.json", "b.jsonl"]
    items = read_raw(files[1])
    assert [line for line, _ in items] == [1, 3]  # the blank line keeps its number
    assert decode_item(items[1][1]) == {"text": "y"}


def test_invalid_json_names_column():
    with pytest.raises(RecordError, match=r"invalid JSON.*column"):
        decode_item('{"text": ')


def test_file_format_detected_from_first_record_that_fits(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('not json\n{"foo": 1}\n{"messages": []}\n')
    assert detect_file_format(path, read_raw(path), "auto") == "messages"
    assert detect_file_format(path, read_raw(path), "sharegpt") == "sharegpt"


def test_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_data_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no \.jsonl"):
        find_data_files(tmp_path)
