"""From a problem to what the model is given, and from its reply to the program the tests run.

Two styles (`eval.tasks.<name>.prompt.style`):

- `chat`: the problem as a conversation through the model's chat template, tokenized as training
  tokenized it. Code problems become one user turn from an instruction (defaults below); the code is
  taken from the reply's first fenced block (`extract`).
- `completion`: the problem's raw text, continued as it stands (a base model; HumanEval's original
  setting): HumanEval's prompt is the start of the function and the generation its body, cut at the
  first stop string.

Programs: HumanEval runs `prompt + completion`, or in chat style `prompt + code` when the code defines the
entry point again (the prompt's docstring-only definition is replaced, its imports kept), then `test`
and `check(entry_point)`; MBPP runs `test_setup_code`, the code, then its asserts; a chat record with
`tests` runs the code, then the tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mftune.config.eval_schema import PromptConfig
from mftune.eval.problems import Problem

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one ```python code block."
    "\n\n```python\n{prompt}```"
)
MBPP_INSTRUCTION = (
    "{prompt}\nYour code should pass these tests:\n\n{tests}\n\n"
    "Reply with the code in one ```python code block."
)
MBPP_COMPLETION = '"""\n{prompt}\nYour code should pass these tests:\n\n{tests}\n"""\n'
# Codex's stop sequences (Chen et al., 2021): a new top-level statement ends the function.
CODE_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Prompt:
    """What the model continues: chat `messages`, or raw `text` (completion style)."""

    style: str
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None
    stop: tuple[str, ...] = ()


def resolve_style(cfg: PromptConfig, has_chat_template: bool) -> str:
    """`chat` or `completion`: the configured style, `auto` meaning chat when there is a chat template."""
    if cfg.style != "auto":
        return cfg.style
    return "chat" if has_chat_template else "completion"


def build_prompt(problem: Problem, cfg: PromptConfig, style: str) -> Prompt:
    """The prompt of `problem` in `style` under `cfg` (see the module docstring)."""
    if style == "completion":
        return Prompt("completion", text=_completion_text(problem, cfg), stop=_stops(problem, cfg))
    messages = list(problem.messages or ())
    if problem.kind in ("humaneval", "mbpp"):
        default = HUMANEVAL_INSTRUCTION if problem.kind == "humaneval" else MBPP_INSTRUCTION
        messages = [{"role": "user", "content": _fill(cfg.instruction or default, problem)}]
    elif cfg.instruction is not None:
        messages[-1] = {
            "role": "user",
            "content": cfg.instruction.replace("{prompt}", messages[-1]["content"]),
        }
    if cfg.system is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": cfg.system})
    return Prompt("chat", messages=tuple(messages), stop=tuple(cfg.stop or ()))


def _fill(template: str, problem: Problem) -> str:
    # str.replace, not str.format: problems are full of braces.
    return template.replace("{prompt}", problem.prompt or "").replace("{tests}", "\n".join(problem.test_list))


def _completion_text(problem: Problem, cfg: PromptConfig) -> str:
    if problem.kind == "humaneval":
        return _fill(cfg.instruction, problem) if cfg.instruction else problem.prompt or ""
    if problem.kind == "mbpp":
        return _fill(cfg.instruction or MBPP_COMPLETION, problem)
    text = "\n".join(m["content"] for m in problem.messages or ()) + "\n"
    return cfg.instruction.replace("{prompt}", text) if cfg.instruction else text


def _stops(problem: Problem, cfg: PromptConfig) -> tuple[str, ...]:
    if cfg.stop is not None:
        return tuple(cfg.stop)
    return tuple(CODE_STOPS) if problem.kind in ("humaneval", "mbpp") else ()


def cut_at_stops(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to the first of `stops` (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


def extract_code(reply: str, mode: str) -> str:
    """The code in a chat reply: its first fenced block labelled python (else its first block), under
    `fenced` nothing when there is no block, under `auto` the whole reply then, under `none` always it."""
    if mode == "none":
        return reply
    blocks = _FENCE.findall(reply)
    python = [code for label, code in blocks if label.lower() in ("python", "py", "python3")]
    chosen = python or [code for _, code in blocks]
    if chosen:
        return chosen[0]
    return "" if mode == "fenced" else reply


def build_program(problem: Problem, generation: str, style: str, extract: str) -> str:
    """The program that runs `generation` (already cut at stop strings) against `problem`'s tests."""
    code = generation if style == "completion" else extract_code(generation, extract)
    if problem.kind == "humaneval":
        prompt = problem.prompt or ""
        defines = re.search(rf"^def\s+{re.escape(problem.entry_point or '')}\s*\(", code, re.MULTILINE)
        body = f"{prompt}\n{code}" if style == "chat" and defines else prompt + code
        return f"{body}\n\n{problem.tests}"
    if problem.kind == "mbpp":
        return f"{problem.setup}\n{code}\n\n{problem.tests}"
    return f"{code}\n\n{problem.tests}"
