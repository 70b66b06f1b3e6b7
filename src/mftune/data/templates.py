"""Templates: a `Conversation` rendered to text once, with the character spans that are trained.

Three kinds (DESIGN.md §2): MFTCoder's role markers, a Jinja file, and the tokenizer's own chat template.
Each can also render an inference prompt, and each has a Jinja chat template that is saved with the
trained model so `apply_chat_template` reproduces the training text exactly.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mftune.data.conversation import Conversation, Turn

Span = tuple[int, int]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Rendered:
    """Rendered text, its trained character spans `[start, end)` (sorted, disjoint), and where the text is
    cut before tokenizing.

    The text is tokenized piece by piece, cut at every span boundary and at every position in `cuts`, so
    that no token straddles a prompt and its answer (DESIGN.md §2).
    """

    text: str
    spans: tuple[Span, ...]
    cuts: tuple[int, ...] = ()

    def pieces(self) -> list[Span]:
        """The `[start, end)` character ranges tokenized one by one, in order, covering the text."""
        bounds = {0, len(self.text), *self.cuts, *(edge for span in self.spans for edge in span)}
        ordered = sorted(b for b in bounds if 0 <= b <= len(self.text))
        return [(a, b) for a, b in itertools.pairwise(ordered) if b > a]


class Template(Protocol):
    """What the rest of mftune needs from a template."""

    def render(self, conversation: Conversation) -> Rendered:
        """The whole conversation with the trained spans (every assistant turn and its stop token)."""
        ...

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        """The text an inference prompt renders to: `messages` followed by the assistant's opening."""
        ...

    def chat_template(self) -> str:
        """A Jinja chat template that renders like this template, to save with the tokenizer."""
        ...


class RoleMarkersTemplate:
    """MFTCoder's format, as its encoder builds it (`UniformEncoder` in
    `mftcoder_accelerate/src/data/preprocess_data.py`), so that MFTCoder and mftune train the same ids:

    ```
    <s>system\n{system}\n<s>human\n{user}\n<s>bot\n{assistant}\n</s>\n<s>human\n...
    ```

    - every content is followed by `\n`; U+00A0 and U+202F (no-break spaces) in it become spaces;
    - trained: each assistant content, its `\n` and the stop token; not trained: the `\n` after the stop
      token, and everything else;
    - tokenized piece by piece as the encoder does: the system turn; each user turn with the assistant
      marker that follows it; each assistant content with its `\n`; the stop token; the `\n` after it;
    - a single prompt/answer record (alpaca and the other pairs) is rendered as the encoder renders those:
      system and user in one piece, and nothing after the stop token.
    """

    def __init__(self, system: str, user: str, assistant: str, stop_token: str):
        self.markers = {"system": system, "user": user, "assistant": assistant}
        self.stop_token = stop_token

    def render(self, conversation: Conversation) -> Rendered:
        text, spans, cuts = "", [], []
        pair = conversation.is_single_pair
        for turn in conversation.turns:
            content = _mftcoder_content(turn.content)
            if turn.role == "assistant":  # its marker closes the user turn before it
                answer_start = len(text)
                text += content
                cuts.append(len(text))  # the stop token is an id of its own in MFTCoder's encoder
                text += self.stop_token
                spans.append((answer_start, len(text)))
                text += "" if pair else "\n"
                continue
            if not pair:  # a pair's system and user turns are one piece
                cuts.append(len(text))
            text += self.markers[turn.role] + content
            if turn.role == "user":
                text += self.markers["assistant"]  # MFTCoder encodes it with the user turn
        return Rendered(text, tuple(spans), tuple(cuts))

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        turns = tuple(Turn(m["role"], m["content"]) for m in messages)  # type: ignore[arg-type]
        text = self.render(Conversation(turns)).text  # a user turn already ends with the assistant marker
        return text if turns and turns[-1].role == "user" else text + self.markers["assistant"]

    def chat_template(self) -> str:
        # json.dumps gives a valid Jinja string literal for any marker (quotes, newlines, unicode).
        sys_m, user_m, bot_m = (
            json.dumps(self.markers[r], ensure_ascii=False) for r in ("system", "user", "assistant")
        )
        stop = json.dumps(self.stop_token, ensure_ascii=False)
        content = "(message['content'] | replace('\\u00a0', ' ') | replace('\\u202f', ' ')) + '\\n'"
        return (
            "{%- for message in messages -%}"
            f"{{%- if message['role'] == 'system' -%}}{{{{ {sys_m} + {content} }}}}"
            f"{{%- elif message['role'] == 'user' -%}}{{{{ {user_m} + {content} }}}}"
            f"{{%- else -%}}{{{{ {bot_m} }}}}{{% generation %}}{{{{ {content} + {stop} }}}}"
            "{% endgeneration %}{{ '\\n' }}"
            "{%- endif -%}{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {bot_m} }}}}{{%- endif -%}}"
        )


def _mftcoder_content(content: str) -> str:
    """A turn's content as MFTCoder's encoder writes it: no-break spaces as spaces, then a newline."""
    return content.replace("\u202f", " ").replace("\xa0", " ") + "\n"


class JinjaTemplate:
    """A Jinja chat template (a user's file or the tokenizer's own).

    Trained spans come from `{% generation %}` blocks, rendered by transformers' own machinery. A template
    without them is handled by rendering growing prefixes of the conversation: what an assistant turn adds
    after the generation prompt is its trained span. That works for any template whose renders of a
    conversation's prefixes are prefixes of the whole render (true of every common chat template), and
    is checked per record. `train_all=True` trains every token instead (the behaviour of plain Jinja
    fine-tuning scripts), for templates written for raw records rather than conversations.
    """

    def __init__(self, source: str, special_tokens: dict[str, str], *, train_all: bool = False):
        self.source = source
        self.special_tokens = special_tokens
        self.has_generation = bool(_GENERATION_TAG.search(source))
        self.train_all = train_all and not self.has_generation

    def _render(self, messages: list[dict], record: dict, *, add_generation_prompt: bool, track: bool):
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(
            [messages],
            chat_template=self.source,
            return_assistant_tokens_mask=track,
            add_generation_prompt=add_generation_prompt,
            record=record,
            **self.special_tokens,
        )
        return rendered[0], (indices[0] if track else [])

    def render(self, conversation: Conversation) -> Rendered:
        messages = conversation.as_messages()
        record = conversation.record
        if self.has_generation:
            text, indices = self._render(messages, record, add_generation_prompt=False, track=True)
            return Rendered(text, tuple((s, e) for s, e in indices if e > s))
        text, _ = self._render(messages, record, add_generation_prompt=False, track=False)
        if self.train_all:
            return Rendered(text, ((0, len(text)),))
        return Rendered(text, tuple(self._prefix_spans(messages, record, text)))

    def _prefix_spans(self, messages: list[dict], record: dict, text: str) -> list[Span]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, _ = self._render(messages[:i], record, add_generation_prompt=True, track=False)
            after, _ = self._render(messages[: i + 1], record, add_generation_prompt=False, track=False)
            if not (text.startswith(after) and after.startswith(before)):
                raise ValueError(
                    "the chat template does not render a conversation's prefixes as prefixes of the whole; "
                    "mark assistant turns with {% generation %}...{% endgeneration %}"
                )
            spans.append((len(before), len(after)))
        return spans

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return self._render(messages, {}, add_generation_prompt=True, track=False)[0]

    def chat_template(self) -> str:
        return self.source


def render_text_record(conversation: Conversation, stop_token: str) -> Rendered:
    """Raw text (format `text`): its text and a stop token, all trained; the stop token is tokenized on
    its own."""
    text = "".join(t.content for t in conversation.turns)
    return Rendered(text + stop_token, ((0, len(text) + len(stop_token)),), (len(text),))


def render(
    template: Template, conversation: Conversation, stop_token: str, train_on: str = "assistant"
) -> Rendered:
    """Render any conversation; `train_on="all"` trains every token, not only the assistant turns.

    Raw-text records bypass the template: under role markers they end with `\\n` and the stop token, as
    MFTCoder's encoder writes them (no-break spaces as spaces), elsewhere with the stop token alone.
    """
    if conversation.turns and conversation.turns[0].role == "text":
        if isinstance(template, RoleMarkersTemplate):
            text = Conversation(tuple(Turn("text", _mftcoder_content(t.content)) for t in conversation.turns))
            return render_text_record(text, stop_token)
        return render_text_record(conversation, stop_token)
    rendered = template.render(conversation)
    if train_on == "all":
        return Rendered(rendered.text, ((0, len(rendered.text)),), rendered.cuts)
    return rendered


def build_template(template_cfg, tokenizer) -> tuple[Template, str]:
    """The template a config asks for, and the stop token that closes each assistant turn.

    Args:
        template_cfg: `data.template` of the config (paths already resolved).
        tokenizer: a Hugging Face tokenizer (for EOS, BOS and its own chat template).

    Raises:
        ValueError: the template cannot produce trained spans that end with the stop token.
    """
    specials = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    if template_cfg.kind == "role_markers":
        m = template_cfg.role_markers
        stop = template_cfg.stop_token or tokenizer.eos_token
        if not stop:
            raise ValueError("the tokenizer has no EOS token; set data.template.stop_token")
        template: Template = RoleMarkersTemplate(m.system, m.user, m.assistant, stop)
    elif template_cfg.kind == "jinja":
        source = Path(template_cfg.jinja_file).read_text(encoding="utf-8")
        template = JinjaTemplate(source, specials, train_all=not _GENERATION_TAG.search(source))
        if template.train_all:
            warnings.warn(
                f"{template_cfg.jinja_file} has no {{% generation %}} blocks: every token is trained",
                stacklevel=2,
            )
    else:
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ValueError("data.template.kind is 'tokenizer' but the tokenizer has no chat_template")
        template = JinjaTemplate(source, specials)
    stop_token = template_cfg.stop_token or _stop_token_of(template, tokenizer)
    check_stop_token_trained(template, stop_token)
    return template, stop_token


def _stop_token_of(template: Template, tokenizer) -> str:
    """The special token that closes an assistant turn in this template, else the tokenizer's EOS.

    Chat templates close turns with their own token (`<|im_end|>`, `<|eot_id|>`), not always EOS.
    """
    if isinstance(template, JinjaTemplate):
        rendered = template.render(PROBE)
        if rendered.spans:
            start, end = rendered.spans[0]
            tail = rendered.text[start:end].rstrip()
            specials = sorted(
                set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
            )
            closing = [t for t in specials if t and tail.endswith(t)]
            if closing:
                return max(closing, key=len)
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no EOS token; set data.template.stop_token")
    return tokenizer.eos_token


PROBE = Conversation(
    turns=(
        Turn("system", "You are helpful."),
        Turn("user", "Say one."),
        Turn("assistant", "one"),
        Turn("user", "Say two."),
        Turn("assistant", "two"),
    ),
    record={"instruction": "Say one.", "input": "", "output": "one", "system": "You are helpful."},
)


def check_stop_token_trained(template: Template, stop_token: str) -> None:
    """Refuse a template that leaves the stop token untrained (a model that never stops) or trains nothing.

    Raises:
        ValueError: with what the probe conversation rendered to.
    """
    rendered = template.render(PROBE)
    if not rendered.spans:
        raise ValueError(
            f"the template trains no token; it renders the probe conversation as {rendered.text!r}"
        )
    for start, end in rendered.spans:
        if not rendered.text[start:end].rstrip().endswith(stop_token):
            raise ValueError(
                f"the template leaves the stop token {stop_token!r} outside the trained span "
                f"{rendered.text[start:end]!r}; a model trained on it would never stop "
                "(put the stop token inside {% generation %}, or set data.template.stop_token)"
            )
