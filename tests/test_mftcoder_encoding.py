"""Role markers reproduce MFTCoder's encoder (`UniformEncoder`, mftcoder_accelerate/src/data/preprocess_data.py)
token for token: ids and loss masks written by hand here, from the encoder's rules, on a word-level tokenizer
whose ids can be read off its vocabulary.

The encoder's rules, as its code applies them:
- every content gets `\\n` appended (no-break spaces U+00A0 and U+202F become spaces first);
- a leading system turn is the piece `system_marker + content`, not trained;
- a user turn is the piece `user_marker + content + assistant_marker`, not trained;
- an assistant turn is the piece `content`, then the EOS id, both trained, then the piece `\\n`, not trained;
- a prompt/answer record is `[system_marker + system] + user_marker + prompt + assistant_marker`, not trained,
  then `answer` and the EOS id, trained, and nothing after;
- a text record is `text` and the EOS id, all trained;
- `tokenize_mode: pretrain` empties the markers and trains every token;
- each piece is tokenized on its own.
"""

from __future__ import annotations

import pytest

from mftune.config import TemplateConfig
from mftune.data.formats import detect_format, parse_record
from mftune.data.templates import build_template, render
from mftune.data.tokenize import tokenize_rendered

WORDS = [
    "system",
    "human",
    "bot",
    "brief",
    "hi",
    "yo",
    "ok",
    "go",
    "a",
    "b",
    "#",
    ":",
    "System",
    "Instruction",
]
WORDS += ["Response"]
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 4, " ": 5} | {
    w: 6 + i for i, w in enumerate(WORDS)
}
S, EOS, NL, SP = 1, 2, 4, 5
SYSTEM, HUMAN, BOT, BRIEF, HI, YO, OK, GO, A, B, HASH, COLON = range(6, 18)
SYSTEM_CAP, INSTRUCTION, RESPONSE = 18, 19, 20


@pytest.fixture(scope="module")
def words_tokenizer():
    """Words, single spaces, newlines and punctuation each one token; <s> and </s> special."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| |[A-Za-z]+|[^A-Za-z\s]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def encode(tokenizer, record: dict, train_on: str = "assistant", **template) -> tuple[list[int], list[int]]:
    """mftune's ids and 0/1 loss mask of one record."""
    tpl, stop = build_template(TemplateConfig(**template), tokenizer)
    conversation = parse_record(record, detect_format(record))
    sample = tokenize_rendered(tokenizer, render(tpl, conversation, stop, train_on), 4096, "drop")
    return sample.input_ids.tolist(), sample.trained.astype(int).tolist()


def pieces(*parts: tuple[list[int], int]) -> tuple[list[int], list[int]]:
    """Concatenate (ids, trained) pieces into ids and a loss mask."""
    ids = [i for piece, _ in parts for i in piece]
    mask = [flag for piece, flag in parts for _ in piece]
    return ids, mask


def test_multi_turn_chat_rounds_with_a_system_turn(words_tokenizer):
    record = {
        "chat_rounds": [
            {"role": "system", "content": "brief"},
            {"role": "human", "content": "hi"},
            {"role": "bot", "content": "yo"},
            {"role": "human", "content": "ok"},
            {"role": "bot", "content": "go"},
        ]
    }
    expected = pieces(
        ([S, SYSTEM, NL, BRIEF, NL], 0),
        ([S, HUMAN, NL, HI, NL, S, BOT, NL], 0),
        ([YO, NL, EOS], 1),
        ([NL], 0),
        ([S, HUMAN, NL, OK, NL, S, BOT, NL], 0),
        ([GO, NL, EOS], 1),
        ([NL], 0),
    )
    assert encode(words_tokenizer, record) == expected


def test_chat_rounds_without_a_system_turn_and_no_break_spaces(words_tokenizer):
    record = {
        "chat_rounds": [{"role": "human", "content": "a\u00a0b"}, {"role": "bot", "content": "a\u202fb"}]
    }
    expected = pieces(([S, HUMAN, NL, A, SP, B, NL, S, BOT, NL], 0), ([A, SP, B, NL, EOS], 1), ([NL], 0))
    assert encode(words_tokenizer, record) == expected


def test_custom_role_markers(words_tokenizer):
    markers = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
    record = {
        "chat_rounds": [
            {"role": "system", "content": "brief"},
            {"role": "human", "content": "hi"},
            {"role": "bot", "content": "yo"},
        ]
    }
    hashes = [HASH, HASH, HASH, SP]
    expected = pieces(
        ([*hashes, SYSTEM_CAP, COLON, NL, BRIEF, NL], 0),
        ([*hashes, INSTRUCTION, COLON, NL, HI, NL, *hashes, RESPONSE, COLON, NL], 0),
        ([YO, NL, EOS], 1),
        ([NL], 0),
    )
    assert encode(words_tokenizer, record, role_markers=markers) == expected


@pytest.mark.parametrize(
    "record",
    [
        {"system": "brief", "prompt": "hi", "answer": "yo"},
        {"system": "brief", "instruction": "hi", "output": "yo"},
        {"system": "brief", "question": "hi", "response": "yo"},
    ],
)
def test_prompt_answer_records(words_tokenizer, record):
    expected = pieces(([S, SYSTEM, NL, BRIEF, NL, S, HUMAN, NL, HI, NL, S, BOT, NL], 0), ([YO, NL, EOS], 1))
    assert encode(words_tokenizer, record) == expected


def test_text_records_end_with_a_newline_and_eos_all_trained(words_tokenizer):
    assert encode(words_tokenizer, {"text": "hi yo"}) == pieces(([HI, SP, YO, NL, EOS], 1))


def test_pretrain_mode_empties_the_markers_and_trains_every_token(words_tokenizer):
    record = {"chat_rounds": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    empty = {"system": "", "user": "", "assistant": ""}
    expected = pieces(([HI, NL], 1), ([YO, NL, EOS], 1), ([NL], 1))
    assert encode(words_tokenizer, record, train_on="all", role_markers=empty) == expected
