"""Templates and labels: which characters and tokens are trained, checked against hand-written expectations."""

import re
import warnings

import numpy as np
import pytest

from mftune.config import TemplateConfig
from mftune.data.conversation import Conversation, Turn
from mftune.data.templates import JinjaTemplate, RoleMarkersTemplate, build_template, render
from mftune.data.tokenize import SampleDropped, tokenize_rendered

CONV = Conversation(
    turns=(
        Turn("system", "Be brief."),
        Turn("user", "2 + 2?"),
        Turn("assistant", "4"),
        Turn("user", "and 3 * 3?"),
        Turn("assistant", "9"),
    )
)

CHATML_NO_GENERATION = (
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{{ '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)


def trained_text(tokenizer, sample) -> list[str]:
    """The decoded runs of trained tokens: an expectation that does not depend on token ids."""
    runs, current = [], []
    for token, is_trained in zip(sample.input_ids, sample.trained, strict=True):
        if is_trained:
            current.append(int(token))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def template_of(tokenizer, **kwargs):
    return build_template(TemplateConfig(**kwargs), tokenizer)


def test_role_markers_render_mftcoder_format(tokenizer):
    template, stop = template_of(tokenizer)
    assert stop == "</s>"
    rendered = template.render(CONV)
    assert (
        rendered.text
        == "<s>system\nBe brief.\n<s>human\n2 + 2?\n<s>bot\n4\n</s>\n<s>human\nand 3 * 3?\n<s>bot\n9\n</s>\n"
    )
    # The answer, its newline and the stop token are trained; the newline after the stop token is not.
    assert [rendered.text[s:e] for s, e in rendered.spans] == ["4\n</s>", "9\n</s>"]


def test_role_markers_labels_every_assistant_turn_and_its_eos(tokenizer):
    template, stop = template_of(tokenizer)
    sample = tokenize_rendered(tokenizer, render(template, CONV, stop), 512, "drop")
    assert trained_text(tokenizer, sample) == ["4\n</s>", "9\n</s>"]
    eos_positions = np.flatnonzero(sample.input_ids == tokenizer.eos_token_id)
    assert len(eos_positions) == 2 and sample.trained[eos_positions].all()


def test_custom_markers(tokenizer):
    template, _stop = template_of(
        tokenizer, role_markers={"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}
    )
    conv = Conversation(turns=(Turn("user", "Hi"), Turn("assistant", "Hello")))
    rendered = template.render(conv)
    assert rendered.text == "### Instruction:\nHi\n### Response:\nHello\n</s>\n"
    sample = tokenize_rendered(tokenizer, rendered, 512, "drop")
    assert trained_text(tokenizer, sample) == ["Hello\n</s>"]


@pytest.mark.parametrize("kind", ["role_markers", "tokenizer"])
def test_training_ids_equal_inference_prompt_ids(tokenizer, kind):
    template, stop = template_of(tokenizer, kind=kind)
    sample = tokenize_rendered(tokenizer, render(template, CONV, stop), 512, "drop")
    ids = sample.input_ids.tolist()
    starts = [i for i in range(len(ids)) if sample.trained[i] and (i == 0 or not sample.trained[i - 1])]
    assistant_turns = [i for i, t in enumerate(CONV.turns) if t.role == "assistant"]
    assert len(starts) == len(assistant_turns) == 2
    for start, turn_index in zip(starts, assistant_turns, strict=True):
        prompt = template.render_prompt(CONV.as_messages()[:turn_index])
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids[:start]


def test_role_markers_chat_template_reproduces_training_text(tokenizer):
    template, _ = template_of(tokenizer)
    messages = CONV.as_messages()
    saved = template.chat_template()
    assert (
        tokenizer.apply_chat_template(messages, chat_template=saved, tokenize=False)
        == template.render(CONV).text
    )
    prompt = tokenizer.apply_chat_template(
        messages[:3], chat_template=saved, tokenize=False, add_generation_prompt=True
    )
    assert prompt == template.render_prompt(messages[:3])


def test_tokenizer_template_uses_generation_blocks(tokenizer):
    template, _stop = template_of(tokenizer, kind="tokenizer")
    rendered = template.render(CONV)
    assert rendered.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    sample = tokenize_rendered(tokenizer, rendered, 512, "drop")
    assert [t.strip() for t in trained_text(tokenizer, sample)] == ["4<|im_end|>", "9<|im_end|>"]


def test_prefix_spans_equal_generation_block_spans(tokenizer):
    """A template without {% generation %} gets the same trained spans by rendering growing prefixes."""
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    with_blocks = tokenizer.chat_template
    assert "generation" in with_blocks
    by_blocks = JinjaTemplate(with_blocks, specials).render(CONV)
    by_prefix = JinjaTemplate(CHATML_NO_GENERATION, specials).render(CONV)
    assert by_prefix.text == by_blocks.text
    # Prefix rendering also trains the newline after <|im_end|>; the blocks' spans lie within.
    assert [by_blocks.text[s:e] for s, e in by_prefix.spans] == ["4<|im_end|>\n", "9<|im_end|>\n"]
    for (bs, be), (ps, pe) in zip(by_blocks.spans, by_prefix.spans, strict=True):
        assert ps == bs and be <= pe


def test_jinja_file_with_record_fields(tokenizer, tmp_path):
    path = tmp_path / "qwen.jinja"
    path.write_text(
        "<|im_start|>user\n{{ record.instruction }}<|im_end|>\n<|im_start|>assistant\n"
        "{% generation %}{{ record.output }}<|im_end|>{% endgeneration %}\n"
    )
    template, stop = template_of(tokenizer, kind="jinja", jinja_file=str(path), stop_token="<|im_end|>")
    conv = Conversation(
        turns=(Turn("user", "Q"), Turn("assistant", "A")), record={"instruction": "Q", "output": "A"}
    )
    sample = tokenize_rendered(tokenizer, render(template, conv, stop), 512, "drop")
    assert trained_text(tokenizer, sample) == ["A<|im_end|>"]


def test_jinja_without_generation_trains_everything_with_a_warning(tokenizer, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("Q: {{ record.instruction }}\nA: {{ record.output }}</s>")
    with pytest.warns(UserWarning, match="every token is trained"):
        template, stop = template_of(tokenizer, kind="jinja", jinja_file=str(path))
    conv = Conversation(
        turns=(Turn("user", "x"), Turn("assistant", "y")), record={"instruction": "x", "output": "y"}
    )
    sample = tokenize_rendered(tokenizer, render(template, conv, stop), 512, "drop")
    assert sample.trained.all()


def test_stop_token_outside_trained_span_is_refused(tokenizer, tmp_path):
    path = tmp_path / "bad.jinja"
    path.write_text(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "</s>{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="outside the trained span"):
        template_of(tokenizer, kind="jinja", jinja_file=str(path))


def test_template_that_trains_nothing_is_refused(tokenizer, tmp_path):
    path = tmp_path / "empty.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% generation %}{% endgeneration %}{% endfor %}")
    with pytest.raises(ValueError, match="trains no token"):
        template_of(tokenizer, kind="jinja", jinja_file=str(path))


def test_text_records_train_every_token_and_end_with_eos(tokenizer):
    template, stop = template_of(tokenizer)
    sample = tokenize_rendered(
        tokenizer, render(template, Conversation((Turn("text", "def f(): pass"),)), stop), 64, "drop"
    )
    assert sample.trained.all()
    assert sample.input_ids[-1] == tokenizer.eos_token_id


def test_overlong_drop_and_truncate(tokenizer):
    template, stop = template_of(tokenizer)
    rendered = render(template, CONV, stop)
    n = len(tokenizer(rendered.text, add_special_tokens=False)["input_ids"])
    with pytest.raises(SampleDropped) as info:
        tokenize_rendered(tokenizer, rendered, n - 1, "drop")
    assert info.value.reason == "overlong"
    kept = tokenize_rendered(tokenizer, rendered, n - 1, "truncate")
    assert kept.truncated and len(kept.input_ids) == n - 1
    assert trained_text(tokenizer, kept)[0] == "4\n</s>"
    # Cut before the first answer: nothing left to train is never trained silently.
    cut = re.search("<s>bot", rendered.text).start()
    short = len(tokenizer(rendered.text[:cut], add_special_tokens=False)["input_ids"])
    with pytest.raises(SampleDropped) as info:
        tokenize_rendered(tokenizer, rendered, short, "truncate")
    assert info.value.reason == "no_trained_tokens"


def test_role_markers_template_class_direct():
    template = RoleMarkersTemplate("S:", "U:", "A:", "<eos>")
    rendered = template.render(Conversation((Turn("user", "q"), Turn("assistant", "a"))))
    assert rendered.text == "U:q\nA:a\n<eos>\n"
    assert rendered.spans == ((6, 13),)  # "U:q\n" + "A:" = 6 chars, then "a\n<eos>"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert template.render_prompt([{"role": "user", "content": "q"}]) == "U:q\nA:"
