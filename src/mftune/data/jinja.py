"""A Jinja chat template (a user's file or the tokenizer's own) as a training template: trained spans, and
the checks that keep a model trained on it from never stopping or learning the wrong format.

Trained spans come from `{% generation %}` blocks, rendered by transformers' own machinery. A template
without them is handled by rendering growing prefixes of the conversation: an assistant turn's span
runs from the end of its generation prompt (`messages[:i]` with `add_generation_prompt`) to where the
render of `messages[:i + 1]` and the whole conversation's part ways. That covers templates that close
every render with EOS (Phi-3) or always end with a generation prompt (StarCoder2-instruct). A template
that renders earlier turns differently from the prompt it gives for the next one (Qwen3 drops `<think>`
from history) cannot be trained on every turn: mark its turns with `{% generation %}`, or train the
last turn only (`data.train_on: last_turn`).

A template whose turns have no closing token of their own (GLM-4: the next `<|user|>` ends a turn) gets
one from `data.template.stop_token`: the next turn's opening token is trained as the stop, and after the
last turn the stop token is appended.
"""

from __future__ import annotations

import re
import warnings

from mftune.data.conversation import Conversation
from mftune.data.rendered import Rendered, Span

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

HISTORY_REWRITE = (
    "the chat template renders earlier turns differently from the prompt it gives for the next one (it "
    "rewrites history, as Qwen3 drops <think>): mark its assistant turns with {% generation %}..."
    "{% endgeneration %} (a training variant of the template), or set data.train_on: last_turn"
)


class JinjaTemplate:
    """A Jinja chat template.

    Args:
        source: the template.
        special_tokens: `bos_token` and `eos_token`, as the template reads them; a template's turn ends are
            never placed inside one of them or of `special_strings`.
        train_all: train every token (a template without `{% generation %}` written for raw records).
        last_turn_only: train only the last assistant turn.
        stop_token: the token that must close each trained span; None until it is known.
        extend_to_stop: a span not closed by the stop token is extended to the stop token right after it
            (or, after the last turn, to one appended): for a `data.template.stop_token` asked for.
    """

    def __init__(
        self,
        source: str,
        special_tokens: dict[str, str],
        *,
        train_all: bool = False,
        last_turn_only: bool = False,
        stop_token: str | None = None,
        extend_to_stop: bool = False,
    ):
        self.source = source
        self.special_tokens = special_tokens
        self.has_generation = bool(GENERATION_TAG.search(source))
        self.train_all = train_all and not self.has_generation
        self.last_turn_only = last_turn_only
        self.stop_token = stop_token
        self.extend_to_stop = extend_to_stop
        self.special_strings = tuple(t for t in special_tokens.values() if t)

    def _render(self, messages: list[dict], record: dict, *, add_generation_prompt: bool, track: bool):
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, indices = render_jinja_template(
                [messages],
                chat_template=self.source,
                return_assistant_tokens_mask=track,
                add_generation_prompt=add_generation_prompt,
                record=record,
                **self.special_tokens,
            )
        except TemplateError as err:  # raise_exception(...) in the template, or a template bug
            raise ValueError(f"the chat template refuses this conversation: {err}") from None
        return rendered[0], (indices[0] if track else [])

    def render(self, conversation: Conversation) -> Rendered:
        messages = conversation.as_messages()
        record = conversation.record
        if self.has_generation:
            text, indices = self._render(messages, record, add_generation_prompt=False, track=True)
            spans = [(s, e) for s, e in indices if e > s]
        else:
            text, _ = self._render(messages, record, add_generation_prompt=False, track=False)
            if self.train_all:
                return Rendered(text, ((0, len(text)),))
            spans = self._prefix_spans(messages, record, text)
        if self.last_turn_only:
            spans = spans[-1:]
        if self.stop_token is not None:
            text, spans = self._closed(text, spans)
        return Rendered(text, tuple(spans))

    def _prefix_spans(self, messages: list[dict], record: dict, text: str) -> list[Span]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans = []
        for i in turns[-1:] if self.last_turn_only else turns:
            before, _ = self._render(messages[:i], record, add_generation_prompt=True, track=False)
            after, _ = self._render(messages[: i + 1], record, add_generation_prompt=False, track=False)
            if not (text.startswith(before) and after.startswith(before)):
                raise ValueError(HISTORY_REWRITE)
            # A turn ends where its render and the render with what follows it part ways; for the last
            # turn, what follows is one more user turn (so what every render ends with is not trained).
            following = text if i != len(messages) - 1 else self._with_next_turn(messages, record, text)
            end = len(after) if following.startswith(after) else self._turn_end(after, following, len(before))
            if end <= len(before) and following is not text:
                end = len(after)  # one more turn rewrites this one (Qwen3, Mistral): the render's own end
            if end <= len(before):  # the turn renders otherwise once it is history
                raise ValueError(HISTORY_REWRITE)
            spans.append((len(before), end))
        return spans

    def _with_next_turn(self, messages: list[dict], record: dict, text: str) -> str:
        extended = [*messages, {"role": "user", "content": "next"}]
        try:
            return self._render(extended, record, add_generation_prompt=False, track=False)[0]
        except ValueError:  # a template that refuses it: the last turn then runs to the end
            return text

    def _turn_end(self, alone: str, whole: str, start: int) -> int:
        """Where a turn ends in `whole` when its render `alone` ends otherwise (with EOS, or a trailing
        generation prompt): where the two part ways, moved back to the start of a special token cut there,
        and, unless a special token then ends the turn, to just after the last newline."""
        end = start
        while end < min(len(alone), len(whole)) and alone[end] == whole[end]:
            end += 1
        for token in self.special_strings:
            # A token of `alone` begun but not finished before `end` (`<` of `</s>` against `<|user|>`).
            begun = alone.rfind(token, start, end + len(token))
            if begun != -1 and begun < end < begun + len(token):
                end = begun
        if any(whole.endswith(token, start, end) for token in self.special_strings):
            return end
        newline = whole.rfind("\n", start, end)
        return newline + 1 if newline != -1 else end

    def _closed(self, text: str, spans: list[Span]) -> tuple[str, list[Span]]:
        """Each span ending with the stop token: as rendered; else up to the stop token that opens the next
        turn; after the last turn with the stop token appended. Raises ValueError if none applies."""
        stop, closed = self.stop_token, []
        for k, (start, end) in enumerate(spans):
            if self.closes(text[start:end]):
                closed.append((start, end))
            elif self.extend_to_stop and text.startswith(stop, end):
                closed.append((start, end + len(stop)))
            elif self.extend_to_stop and k == len(spans) - 1 and not text[end:].strip():
                text = text[:end] + stop + text[end:]
                closed.append((start, end + len(stop)))
            else:
                raise ValueError(
                    f"the chat template leaves the stop token {stop!r} outside the trained span "
                    f"{text[start:end]!r}: a model trained on it would never stop (put it inside "
                    "{% generation %}, or set data.template.stop_token to the token that ends a turn)"
                )
        return text, closed

    def closes(self, span_text: str) -> bool:
        """Whether a trained span ends with the stop token (then only whitespace, or EOS: Phi-3 ends every
        render with it)."""
        stop = self.stop_token
        if not stop or stop not in span_text:
            return False
        tail = span_text[span_text.rindex(stop) + len(stop) :]
        eos = self.special_tokens.get("eos_token") or ""
        return not (tail.replace(eos, "") if eos else tail).strip()

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return self._render(messages, {}, add_generation_prompt=True, track=False)[0]

    def chat_template(self) -> str:
        return self.source

    def check_generation_blocks(self, conversation: Conversation) -> None:
        """Warn where `{% generation %}` blocks do not start where the generation prompt ends (TRL's Qwen2.5
        training variant trains the prompt's trailing newline of every turn)."""
        if not self.has_generation:
            return
        messages = conversation.as_messages()
        rendered = self.render(conversation)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"][-len(rendered.spans) :]
        for i, (start, _) in zip(turns, rendered.spans, strict=True):
            prompt = self.render_prompt(messages[:i])
            if not rendered.text.startswith(prompt):
                continue  # history rewritten: nothing to compare with
            if start < len(prompt):
                what = f"train part of the generation prompt ({rendered.text[start : len(prompt)]!r})"
            elif start > len(prompt):
                what = f"leave {rendered.text[len(prompt) : start]!r} untrained between prompt and answer"
            else:
                continue
            warnings.warn(f"the chat template's {{% generation %}} blocks {what}", stacklevel=3)
            return
