"""Templates: a `Conversation` rendered to text once, with the character spans that are trained.

Three kinds (DESIGN.md §2): MFTCoder's role markers, a Jinja file, and the tokenizer's own chat template.
Each can also render an inference prompt, and each has a Jinja chat template that is saved with the
trained model so `apply_chat_template` reproduces the training text exactly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Protocol

from mftune.data.conversation import Conversation, Turn
from mftune.data.jinja import GENERATION_TAG, HISTORY_REWRITE, JinjaTemplate
from mftune.data.rendered import Rendered


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


def render_text_record(conversation: Conversation, stop_token: str) -> Rendered:
    """Raw text (format `text`): its text and a stop token, all trained; the stop token is tokenized on
    its own."""
    text = "".join(t.content for t in conversation.turns)
    return Rendered(text + stop_token, ((0, len(text) + len(stop_token)),), (len(text),))


def render(
    template: Template, conversation: Conversation, stop_token: str, train_on: str = "assistant"
) -> Rendered:
    """Render any conversation; `train_on` `all` trains every token, `last_turn` the last assistant turn only.

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
    if train_on == "last_turn":
        return Rendered(rendered.text, rendered.spans[-1:], rendered.cuts)
    return rendered


def build_template(template_cfg, tokenizer, train_on: str = "assistant") -> tuple[Template, str]:
    """The template a config asks for, and the stop token that closes each assistant turn.

    The template is judged on what it does to the records themselves: a record it cannot render, or
    whose trained span would not end with the stop token, is a per-record error (data.on_error). Here it
    is only tried on a few probe conversations, skipping those it refuses (Gemma-2 refuses system turns),
    to find its stop token and refuse it outright when it trains no token or never the stop token.

    Args:
        template_cfg: `data.template` of the config (paths already resolved).
        tokenizer: a Hugging Face tokenizer (for EOS, BOS and its own chat template).
        train_on: `data.train_on`.

    Raises:
        ValueError: no stop token can be found, or the template trains no token or leaves the stop token
            out on a probe it renders.
    """
    specials = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    if template_cfg.kind == "role_markers":
        m = template_cfg.role_markers
        stop = template_cfg.stop_token or tokenizer.eos_token
        if not stop:
            raise ValueError("the tokenizer has no EOS token; set data.template.stop_token")
        return RoleMarkersTemplate(m.system, m.user, m.assistant, stop), stop
    last_turn = train_on == "last_turn"
    if template_cfg.kind == "jinja":
        source = Path(template_cfg.jinja_file).read_text(encoding="utf-8")
        template = JinjaTemplate(
            source, specials, train_all=not GENERATION_TAG.search(source), last_turn_only=last_turn
        )
        if template.train_all:
            warnings.warn(
                f"{template_cfg.jinja_file} has no {{% generation %}} blocks: every token is trained",
                stacklevel=2,
            )
            template.stop_token = template_cfg.stop_token or tokenizer.eos_token or ""
            return template, template.stop_token
    else:
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ValueError("data.template.kind is 'tokenizer' but the tokenizer has no chat_template")
        template = JinjaTemplate(source, specials, last_turn_only=last_turn)
    template.special_strings = tuple(
        sorted(
            set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})), key=len
        )
    )
    probe = _probe_that_renders(template)
    template.stop_token = template_cfg.stop_token or _stop_token_of(template, tokenizer, probe)
    template.extend_to_stop = (
        template_cfg.stop_token is not None
    )  # a stop token asked for is trained where it is
    if probe is not None:
        _check_probe(template, probe)
    return template, template.stop_token


def _probe_that_renders(template: JinjaTemplate) -> Conversation | None:
    """The first probe the template renders; None if it refuses them all, which is left to the records,
    unless it refuses them all for rewriting history (then no record can render either).

    Raises:
        ValueError: every probe failed because the template rewrites earlier turns.
    """
    failures = []
    for probe in PROBES:
        try:
            template.render(probe)
        except ValueError as err:
            failures.append(str(err))
            continue
        return probe
    if failures and all(f == HISTORY_REWRITE for f in failures):
        raise ValueError(HISTORY_REWRITE)
    return None


def _stop_token_of(template: JinjaTemplate, tokenizer, probe: Conversation | None) -> str:
    """The special token that closes an assistant turn in this template, else the tokenizer's EOS.

    Chat templates close turns with their own token (`<|im_end|>`, `<|eot_id|>`, `<|end|>`), not always EOS.
    """
    rendered = template.render(probe) if probe is not None else None
    if rendered is not None and rendered.spans:
        start, end = rendered.spans[0]
        tail = rendered.text[start:end].rstrip()
        specials = sorted(
            set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
        )
        closing = [t for t in specials if t and tail.endswith(t)]
        if closing:
            return max(closing, key=len)
        # No closing token of its own, and the next turn's opening token (seen before, opening a turn) ends
        # it: GLM-4's <|user|>.
        opening = [
            t for t in specials if t and rendered.text.startswith(t, end) and t in rendered.text[:start]
        ]
        if opening:
            raise ValueError(
                f"the chat template closes no assistant turn with a token of its own: set "
                f"data.template.stop_token: {max(opening, key=len)!r} (the next turn's opening token)"
            )
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no EOS token; set data.template.stop_token")
    return tokenizer.eos_token


PROBES = (
    Conversation(
        turns=(
            Turn("system", "You are helpful."),
            Turn("user", "Say one."),
            Turn("assistant", "one"),
            Turn("user", "Say two."),
            Turn("assistant", "two"),
        ),
        record={"instruction": "Say one.", "input": "", "output": "one", "system": "You are helpful."},
    ),
    Conversation(
        turns=(
            Turn("user", "Say one."),
            Turn("assistant", "one"),
            Turn("user", "Say two."),
            Turn("assistant", "two"),
        ),
        record={"instruction": "Say one.", "input": "", "output": "one"},
    ),
)


def _check_probe(template: JinjaTemplate, probe: Conversation) -> None:
    """Refuse a template that trains nothing or never the stop token on a probe it renders; warn where its
    generation blocks and its generation prompt disagree.

    Raises:
        ValueError: with what the probe rendered to.
    """
    rendered = template.render(probe)  # raises where the stop token is left out
    if not rendered.spans:
        raise ValueError(
            f"the template trains no token; it renders a probe conversation as {rendered.text!r}"
        )
    template.check_generation_blocks(probe)
