"""Real chat-template behaviours, each reproduced by a minimal template written here: templates judged on the
records themselves, a template's own errors as per-record errors, ids at prompt/answer boundaries equal to
inference's under Qwen2- and Llama-3-style pre-tokenizers, the cache key, templates without a closing
token, templates that rewrite history, and generation blocks that disagree with the generation prompt."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from mftune.config import TemplateConfig, load_config
from mftune.data.cache import _template_date
from mftune.data.conversation import Conversation, Turn
from mftune.data.pipeline import load_tokenizer, prepare_data
from mftune.data.templates import build_template, render
from mftune.data.tokenize import tokenize_rendered

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
SPECIALS += ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# Qwen2's and cl100k's (Llama-3's) pre-tokenizer patterns: both group a run of newlines into one piece.
PATTERNS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
CORPUS = ["Say one.\n\nSay two. Hi there!\n\n\nfour five six\n  indented code\n\treturn x\n"] * 50


def _tokenizer(pattern: str):
    """A byte-level BPE with a real model's pre-tokenizer regex, trained here on a few lines."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(params=list(PATTERNS), scope="module")
def tokenizer(request):
    return _tokenizer(PATTERNS[request.param])


def _template(tokenizer, source: str, train_on: str = "assistant", **cfg):
    tokenizer.chat_template = source
    return build_template(TemplateConfig(kind="tokenizer", **cfg), tokenizer, train_on)


def _conversation(*turns: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Turn(role, content) for role, content in turns))  # type: ignore[arg-type]


def _trained(tokenizer, sample) -> list[str]:
    runs, current = [], []
    for token, trained in zip(sample.input_ids.tolist(), sample.trained.tolist(), strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}{{ m['content'] }}<|im_end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
# Gemma-2's behaviour: a system turn is refused by the template itself.
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}{{ '\\n' }}"
    "{{ m['content'] }}<end_of_turn>{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model{{ '\\n' }}{% endif %}"
)
# Phi-3's: EOS at the end of every render that has no generation prompt.
EOS_EVERY_RENDER = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}<|end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# StarCoder2-instruct's: a generation prompt at the end of every render.
ALWAYS_PROMPT = (
    "{% for m in messages %}{{ '### ' + m['role'] + '\\n' + m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}{{ '### assistant\\n' }}"
)
# GLM-4's: no token closes a turn; the next turn's opening token ends it.
NO_CLOSING = "{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
# Qwen3's: earlier assistant turns lose their <think>...</think> part.
REWRITES_HISTORY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
# TRL's Qwen2.5 training variant's: the generation block starts before the prompt's newline.
BLOCK_TOO_EARLY = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant{% generation %}{{ '\\n' }}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}{% else %}<|im_start|>{{ m['role'] }}{{ '\\n' }}"
    "{{ m['content'] }}<|im_end|>{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
BLOCK_RIGHT = BLOCK_TOO_EARLY.replace(
    "assistant{% generation %}{{ '\\n' }}", "assistant{{ '\\n' }}{% generation %}"
)


# --- 1 and 2: judged on the records; a template's own errors are per-record errors -----------------------


@pytest.mark.parametrize(
    ("source", "stop", "expected"),
    [
        (NO_SYSTEM, "<end_of_turn>", ["one<end_of_turn>\n", "two<end_of_turn>\n"]),
        (EOS_EVERY_RENDER, "<|end|>", ["one<|end|>\n", "two<|end|>\n"]),
        (ALWAYS_PROMPT, "</s>", ["one</s>\n\n", "two</s>\n\n"]),
    ],
)
def test_templates_a_fixed_probe_refused_now_train(tokenizer, source, stop, expected) -> None:
    template, found = _template(tokenizer, source)
    assert found == stop
    conv = _conversation(
        ("user", "Say one."), ("assistant", "one"), ("user", "Say two."), ("assistant", "two")
    )
    sample = tokenize_rendered(tokenizer, render(template, conv, found), 512, "drop")
    assert _trained(tokenizer, sample) == expected


def _task(tmp_path: Path, records: list[dict], source: str, on_error: str, **template) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok_dir = tmp_path / "tok"
    tokenizer = _tokenizer(PATTERNS["qwen2"])
    tokenizer.chat_template = source
    tokenizer.save_pretrained(tok_dir)
    raw = {
        "model": {"name_or_path": str(tok_dir)},
        "data": {
            "tasks": {"t": {"path": str(tmp_path / "data")}},
            "template": {"kind": "tokenizer", **template},
            "on_error": on_error,
            "cache_dir": str(tmp_path / "cache"),
            "num_proc": 1,
            "valid_ratio": 0.0,
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "c.yaml"


def _messages(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_record_the_template_refuses_is_a_per_record_error(tmp_path, on_error) -> None:
    good = _messages(("user", "Say one."), ("assistant", "one"))
    bad = _messages(("system", "Be brief."), ("user", "Say two."), ("assistant", "two"))
    cfg = load_config(_task(tmp_path, [good, bad, good], NO_SYSTEM, on_error))
    data = prepare_data(cfg, load_tokenizer(cfg.model), raise_on_errors=False)
    errors = data.errors()
    assert (
        len(errors) == 1 and "t.jsonl:2" in str(errors[0]) and "System role not supported" in str(errors[0])
    )
    assert len(data.tasks[0].train) == 2  # the other records train


# --- 3: ids at the prompt/answer boundary are inference's ----------------------------------------------


def test_answer_starting_with_a_newline_keeps_inference_prompt_ids(tokenizer) -> None:
    template, stop = _template(tokenizer, CHATML)
    turns = (
        ("user", "Say one."),
        ("assistant", "\nHi there!"),
        ("user", "Say two."),
        ("assistant", "\n\nfour"),
    )
    conv = _conversation(*turns)
    sample = tokenize_rendered(tokenizer, render(template, conv, stop), 512, "drop")
    ids, trained = sample.input_ids.tolist(), sample.trained.tolist()
    starts = [i for i in range(len(ids)) if trained[i] and (i == 0 or not trained[i - 1])]
    messages = conv.as_messages()
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert (
        ids[: starts[0]] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )  # the prompt as inference has it
    # The answer is tokenized as the model generates it after that prompt: on its own.
    answer = tokenizer("\nHi there!<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[starts[0] : starts[0] + len(answer)] == answer
    # Whole-text tokenization would have merged the prompt's newline into the answer's: the boundary won.
    whole = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    assert whole != ids


def test_without_boundary_merges_ids_equal_apply_chat_template(tokenizer) -> None:
    template, stop = _template(tokenizer, CHATML)
    conv = _conversation(
        ("system", "Be brief."),
        ("user", "Say one."),
        ("assistant", "one"),
        ("user", "Say two."),
        ("assistant", "two"),
    )
    sample = tokenize_rendered(tokenizer, render(template, conv, stop), 512, "drop")
    text = tokenizer.apply_chat_template(conv.as_messages(), tokenize=False)
    assert sample.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_generate_tokenizes_a_multi_turn_prompt_as_training_does(tokenizer) -> None:
    from mftune.infer.generate import prompt_ids

    template, stop = _template(tokenizer, CHATML)
    turns = (("user", "Say one."), ("assistant", "\nHi there!"), ("user", "Say two."), ("assistant", "four"))
    sample = tokenize_rendered(tokenizer, render(template, _conversation(*turns), stop), 512, "drop")
    ids, trained = sample.input_ids.tolist(), sample.trained.tolist()
    second = [i for i in range(1, len(ids)) if trained[i] and not trained[i - 1]][1]  # the second answer
    history = [{"role": r, "content": c} for r, c in turns[:3]]
    assert prompt_ids(tokenizer, history) == ids[:second]


# --- 4: the cache key ---------------------------------------------------------------------------------


def test_changing_only_a_special_tokens_string_rebuilds_the_cache(tmp_path) -> None:
    records = [_messages(("user", "Say one."), ("assistant", "one"))]
    config = _task(tmp_path, records, CHATML, "fail")
    cfg = load_config(config)
    assert not prepare_data(cfg, load_tokenizer(cfg.model)).tasks[0].from_cache
    assert prepare_data(cfg, load_tokenizer(cfg.model)).tasks[0].from_cache
    tok_config = tmp_path / "tok" / "tokenizer_config.json"
    settings = json.loads(tok_config.read_text())
    settings["bos_token"] = "<|im_start|>"
    tok_config.write_text(json.dumps(settings))
    assert not prepare_data(cfg, load_tokenizer(cfg.model)).tasks[0].from_cache


def test_a_template_that_stamps_the_date_keys_the_cache_on_it() -> None:
    import datetime

    assert _template_date("{{ strftime_now('%d %b %Y') }}") == datetime.date.today().isoformat()
    assert _template_date(CHATML) == ""


# --- 5: no closing token ------------------------------------------------------------------------------


def test_a_template_without_a_closing_token_names_the_stop_token_that_works(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"set data.template.stop_token: '<\|user\|>'"):
        _template(tokenizer, NO_CLOSING)
    template, stop = _template(tokenizer, NO_CLOSING, stop_token="<|user|>")
    conv = _conversation(
        ("user", "Say one."), ("assistant", "one"), ("user", "Say two."), ("assistant", "two")
    )
    rendered = render(template, conv, stop)
    # The next turn's opening token closes a turn; the last turn gets one appended; both trained.
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["one<|user|>", "two<|user|>"]
    assert rendered.text.endswith("two<|user|>")


# --- 6: templates that rewrite history ------------------------------------------------------------------


def test_a_template_that_rewrites_history_says_what_to_do(tokenizer) -> None:
    template, stop = _template(tokenizer, REWRITES_HISTORY)  # its probes have no <think>: they render
    thinking = _conversation(
        ("user", "Say one."),
        ("assistant", "<think>hmm</think>one"),
        ("user", "Say two."),
        ("assistant", "two"),
    )
    with pytest.raises(ValueError, match=r"rewrites history.*\{% generation %\}.*data.train_on: last_turn"):
        render(template, thinking, stop)
    last, stop = _template(tokenizer, REWRITES_HISTORY, train_on="last_turn")
    rendered = render(last, thinking, stop, "last_turn")
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["two<|im_end|>\n"]


# --- 7: generation blocks against the generation prompt -------------------------------------------------


def test_generation_blocks_that_train_the_prompts_newline_are_flagged(tokenizer) -> None:
    with pytest.warns(UserWarning, match=r"train part of the generation prompt \('\\n'\)"):
        _template(tokenizer, BLOCK_TOO_EARLY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _template(tokenizer, BLOCK_RIGHT)


def test_a_template_whose_prompt_no_turn_starts_with_is_refused_at_set_up(tokenizer) -> None:
    # DeepSeek-V3's: the generation prompt ends with <think> that no rendered turn has.
    source = CHATML.replace(
        "<|im_start|>assistant{{ '\\n' }}{% endif %}", "<|im_start|>assistant{{ '\\n' }}<think>{% endif %}"
    )
    with pytest.raises(ValueError, match="rewrites history"):
        _template(tokenizer, source)
