"""Synthetic code-flavoured tasks for examples, tests and benchmarks.

Four tasks, each small enough for a 2-layer model to learn on a CPU, deliberately unequal in
size and each written in a different record format:

- `arithmetic` (MFTCoder `chat_rounds`): evaluate a small integer expression.
- `list_ops` (OpenAI `messages`): predict the result of a list or string expression.
- `write_function` (ShareGPT `conversations`): write a one-line function from a description.
- `write_test` (alpaca `instruction`/`input`/`output`): write an assert that tests a function.

Everything is drawn from `random.Random`, seeded per task from the global seed and the task
name, so the output is byte-identical across runs and a task's data does not change when
another task's size does. Held-out problems are drawn first and never reused for training.
"""

from __future__ import annotations

import json
import operator
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SEED = 0
TASK_SIZES: dict[str, int] = {"arithmetic": 3000, "list_ops": 1200, "write_function": 600, "write_test": 250}
NUM_HELDOUT = 50
# How an alpaca record's instruction and input join into one user turn (as `mftune.data.formats` does).
ALPACA_JOIN = "\n"

Record = dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """One prompt/answer pair.

    Attributes:
        key: identity of the problem (e.g. the expression); held-out and train keys never overlap.
        instruction: the user's request.
        answer: the exact expected assistant reply.
        input: extra context (alpaca `input`), empty for most tasks.
    """

    key: str
    instruction: str
    answer: str
    input: str = ""

    @property
    def user_text(self) -> str:
        """The whole user turn: instruction, then input if any."""
        return f"{self.instruction}{ALPACA_JOIN}{self.input}" if self.input else self.instruction


# ---------------------------------------------------------------- arithmetic
_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_ARITH_PHRASES = ("Evaluate `{}`.", "What is `{}`?", "Compute `{}`.")


def _evaluate(operands: list[int], ops: list[str]) -> int:
    # Python precedence by hand (no eval): fold `*` first, then `+`/`-` left to right.
    terms, signs = [operands[0]], []
    for op, value in zip(ops, operands[1:], strict=True):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(op)
    total = terms[0]
    for op, value in zip(signs, terms[1:], strict=True):
        total = _OPS[op](total, value)
    return total


def arithmetic_problem(rng: random.Random) -> Problem:
    """An expression of 2-3 operands in 0..20 with `+ - *`, e.g. `3 + 4 * 2` -> `11`."""
    num_ops = rng.randint(1, 2)
    operands = [rng.randint(0, 20) for _ in range(num_ops + 1)]
    ops = [rng.choice(tuple(_OPS)) for _ in range(num_ops)]
    expr = " ".join([str(operands[0])] + [f"{op} {v}" for op, v in zip(ops, operands[1:], strict=True)])
    return Problem(expr, rng.choice(_ARITH_PHRASES).format(expr), str(_evaluate(operands, ops)))


# ---------------------------------------------------------------- list_ops
_LIST_OPS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("sorted({})", sorted),
    ("sorted({}, reverse=True)", lambda v: sorted(v, reverse=True)),
    ("len({})", len),
    ("{}[::-1]", lambda v: v[::-1]),
    ("max({})", max),
    ("min({})", min),
    ("sum({})", sum),
    ("{}[0]", lambda v: v[0]),
    ("{}[-1]", lambda v: v[-1]),
    ("{}[1:]", lambda v: v[1:]),
    ("[x * 2 for x in {}]", lambda v: [x * 2 for x in v]),
)
_STR_OPS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("{}.upper()", str.upper),
    ("{}.capitalize()", str.capitalize),
    ("len({})", len),
    ("{}[::-1]", lambda v: v[::-1]),
    ("sorted({})", sorted),
    ("{}[0]", lambda v: v[0]),
    ("{}[-1]", lambda v: v[-1]),
    ("{} * 2", lambda v: v * 2),
)
_LIST_PHRASES = ("What does `{}` return?", "What is the value of `{}`?", "Evaluate `{}` in Python.")


def _random_word(rng: random.Random, low: int = 2, high: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(low, high)))


def list_ops_problem(rng: random.Random) -> Problem:
    """A list or string expression, e.g. `sorted([3, 1, 2])` -> `[1, 2, 3]`; the answer is its repr."""
    if rng.random() < 0.6:
        value: Any = [rng.randint(0, 9) for _ in range(rng.randint(2, 5))]
        template, fn = rng.choice(_LIST_OPS)
    else:
        value = _random_word(rng, 3, 6)
        template, fn = rng.choice(_STR_OPS)
    expr = template.format(repr(value))
    return Problem(expr, rng.choice(_LIST_PHRASES).format(expr), repr(fn(value)))


# ---------------------------------------------------------------- functions
@dataclass(frozen=True)
class FunctionTemplate:
    """A one-line function family: `def NAME(params): return body`, `{c}` an integer constant.

    Attributes:
        params: the parameter list, e.g. `"a, b"`.
        describes: what the function returns, in words, e.g. `"x plus {c}"`.
        body: the returned expression, e.g. `"x + {c}"`.
        reference: builds an independent Python implementation for a given constant.
        constants: the range of `{c}`, or None when the template has no constant.
    """

    params: str
    describes: str
    body: str
    reference: Callable[[int], Callable[..., Any]]
    constants: range | None = None


_T, _C = FunctionTemplate, range(1, 21)
FUNCTION_TEMPLATES: tuple[FunctionTemplate, ...] = (
    _T("x", "x squared", "x * x", lambda c: lambda x: x**2),
    _T("x", "x cubed", "x * x * x", lambda c: lambda x: x**3),
    _T("x", "x plus {c}", "x + {c}", lambda c: lambda x: x + c, _C),
    _T("x", "x minus {c}", "x - {c}", lambda c: lambda x: x - c, _C),
    _T("x", "x times {c}", "x * {c}", lambda c: lambda x: x * c, _C),
    _T("x", "the remainder of x divided by {c}", "x % {c}", lambda c: lambda x: x % c, range(2, 21)),
    _T("x", "x floor-divided by {c}", "x // {c}", lambda c: lambda x: x // c, range(2, 21)),
    _T("x", "True if x is greater than {c}", "x > {c}", lambda c: lambda x: x > c, _C),
    _T("x", "True if x is less than {c}", "x < {c}", lambda c: lambda x: x < c, _C),
    _T("x", "True if x is even", "x % 2 == 0", lambda c: lambda x: not x & 1),
    _T("x", "the absolute value of x", "abs(x)", lambda c: lambda x: x if x >= 0 else -x),
    _T("a, b", "the sum of a and b", "a + b", lambda c: operator.add),
    _T("a, b", "the product of a and b", "a * b", lambda c: operator.mul),
    _T("a, b", "a minus b", "a - b", lambda c: operator.sub),
    _T("a, b", "the larger of a and b", "max(a, b)", lambda c: lambda a, b: a if a >= b else b),
    _T("a, b", "the smaller of a and b", "min(a, b)", lambda c: lambda a, b: b if a >= b else a),
    _T("s", "s in upper case", "s.upper()", lambda c: str.upper),
    _T("s", "s reversed", "s[::-1]", lambda c: lambda s: "".join(reversed(s))),
    _T("s", "the length of s", "len(s)", lambda c: lambda s: sum(1 for _ in s)),
    _T("s", "s repeated {c} times", "s * {c}", lambda c: lambda s: "".join([s] * c), range(2, 6)),
    _T("xs", "the sum of the list xs", "sum(xs)", lambda c: lambda xs: sum(xs)),
    _T("xs", "the largest element of xs", "max(xs)", lambda c: lambda xs: sorted(xs)[-1]),
    _T("xs", "the last element of xs", "xs[-1]", lambda c: lambda xs: xs[len(xs) - 1]),
    _T("xs", "xs sorted in ascending order", "sorted(xs)", lambda c: sorted),
    _T(
        "xs",
        "xs with every element multiplied by {c}",
        "[v * {c} for v in xs]",
        lambda c: lambda xs: [c * v for v in xs],
        _C,
    ),
    _T("xs", "the first {c} elements of xs", "xs[:{c}]", lambda c: lambda xs: xs[:c], range(1, 5)),
)
# Names that shadow no builtin a body calls (a function `max` returning `max(a, b)` would recurse).
FUNCTION_NAMES = (
    "f", "g", "h", "calc", "compute", "solve", "helper", "transform", "process", "step", "fn", "func",
    "op", "apply_rule", "get_value", "make", "check", "evaluate", "handle", "convert", "scale", "shift",
)  # fmt: skip
_FUNCTION_PHRASES = ("Write a function `{}` that returns {}.", "Write a Python function `{}` returning {}.")


def _function(rng: random.Random) -> tuple[str, str, FunctionTemplate, int]:
    """A random (signature, code, template, constant); constant is 0 for templates without one."""
    template = rng.choice(FUNCTION_TEMPLATES)
    c = rng.choice(template.constants) if template.constants else 0
    signature = f"{rng.choice(FUNCTION_NAMES)}({template.params})"
    return signature, f"def {signature}: return {template.body.format(c=c)}", template, c


def write_function_problem(rng: random.Random) -> Problem:
    """A description such as "returns x plus 3" -> `def f(x): return x + 3`."""
    signature, code, template, c = _function(rng)
    instruction = rng.choice(_FUNCTION_PHRASES).format(signature, template.describes.format(c=c))
    return Problem(code, instruction, code)


def _argument(rng: random.Random, param: str) -> Any:
    if param == "s":
        return _random_word(rng)
    if param == "xs":
        return [rng.randint(0, 9) for _ in range(rng.randint(1, 5))]
    return rng.randint(0, 20)


_TEST_PHRASES = (
    "Write an assert statement that tests this function called with {}.",
    "Write one assert-style test for the function below, calling it with {}.",
)


def write_test_problem(rng: random.Random) -> Problem:
    """A function plus arguments -> `assert f(2, 3) == 5`, the expected value computed by running it."""
    signature, code, template, _ = _function(rng)
    args = [_argument(rng, p) for p in template.params.split(", ")]
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # our own generated one-liner: running it is the point
    name = signature.split("(")[0]
    call = f"{name}({', '.join(map(repr, args))})"
    instruction = rng.choice(_TEST_PHRASES).format(", ".join(map(repr, args)))
    return Problem(
        f"{code} | {call}", instruction, f"assert {call} == {namespace[name](*args)!r}", input=code
    )


# ---------------------------------------------------------------- records
_SYSTEMS = {
    "arithmetic": ("You are a calculator. Reply with the value only.", "Evaluate integer expressions."),
    "list_ops": ("Predict the result of Python expressions. Reply with its repr only.",),
    "write_function": ("You write one-line Python functions.",),
    "write_test": (),
}
_SYSTEM_PROBABILITY = {"arithmetic": 0.8, "list_ops": 0.5, "write_function": 0.25, "write_test": 0.0}
_PROBLEMS: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": arithmetic_problem,
    "list_ops": list_ops_problem,
    "write_function": write_function_problem,
    "write_test": write_test_problem,
}


def _system(task: str, rng: random.Random) -> str | None:
    return rng.choice(_SYSTEMS[task]) if rng.random() < _SYSTEM_PROBABILITY[task] else None


def _arithmetic_record(index: int, problems: list[Problem], system: str | None) -> Record:
    rounds = [{"role": "system", "content": system}] if system else []
    for i, p in enumerate(problems):
        # Follow-up questions read like a conversation: "And `5 - 2`?"
        human = p.instruction if i == 0 else f"And `{p.key}`?"
        rounds += [{"role": "human", "content": human}, {"role": "bot", "content": p.answer}]
    return {"id": index, "data_name": "arithmetic", "chat_rounds": rounds}


def _record(task: str, problem: Problem, system: str | None) -> Record:
    if task == "list_ops":
        messages = [{"role": "system", "content": system}] if system else []
        messages += [
            {"role": "user", "content": problem.user_text},
            {"role": "assistant", "content": problem.answer},
        ]
        return {"messages": messages}
    if task == "write_function":
        turns = [{"from": "system", "value": system}] if system else []
        turns += [{"from": "human", "value": problem.user_text}, {"from": "gpt", "value": problem.answer}]
        return {"conversations": turns}
    return {"instruction": problem.instruction, "input": problem.input, "output": problem.answer}


def _heldout_record(task: str, problem: Problem, system: str | None) -> Record:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": problem.user_text})
    return {"task": task, "messages": messages, "answer": problem.answer}


class _UniqueDraws:
    """Draws problems whose keys were never drawn before (held-out first, then train)."""

    def __init__(self, task: str, rng: random.Random) -> None:
        self.task, self.rng = task, rng
        self.seen: set[str] = set()

    def __call__(self) -> Problem:
        for _ in range(10_000):
            problem = _PROBLEMS[self.task](self.rng)
            if problem.key not in self.seen:
                self.seen.add(problem.key)
                return problem
        raise ValueError(f"task {self.task!r} ran out of distinct problems; lower its size")


def generate_task(
    task: str, num_train: int, num_heldout: int = NUM_HELDOUT, seed: int = DEFAULT_SEED
) -> tuple[list[Record], list[Record]]:
    """Generate one task's train records (in its own format) and held-out records.

    Args:
        task: one of `TASK_SIZES`.
        num_train: number of train records (an `arithmetic` record may hold up to 3 problems).
        num_heldout: number of held-out records, single-turn, disjoint from train.
        seed: global seed; the task's generator is seeded from it and the task name.

    Returns:
        `(train, heldout)`; held-out records are `{"task", "messages", "answer"}`.

    Raises:
        ValueError: unknown task, or more distinct problems asked than the task can produce.
    """
    if task not in _PROBLEMS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(_PROBLEMS)}")
    rng = random.Random(f"{seed}:{task}")  # a str seed is hashed stably, independent of PYTHONHASHSEED
    draw = _UniqueDraws(task, rng)
    heldout = [_heldout_record(task, draw(), _system(task, rng)) for _ in range(num_heldout)]
    train = []
    for index in range(num_train):
        system = _system(task, rng)
        if task == "arithmetic":
            num_rounds = rng.choice((2, 3)) if rng.random() < 0.3 else 1
            train.append(_arithmetic_record(index, [draw() for _ in range(num_rounds)], system))
        else:
            train.append(_record(task, draw(), system))
    return train, heldout


def generate_all(
    seed: int = DEFAULT_SEED, scale: float = 1.0, num_heldout: int = NUM_HELDOUT
) -> dict[str, tuple[list[Record], list[Record]]]:
    """Generate every task: `{task: (train, heldout)}`, train sizes `TASK_SIZES` times `scale`."""
    return {
        task: generate_task(task, max(1, round(size * scale)), num_heldout, seed)
        for task, size in TASK_SIZES.items()
    }


def _write_jsonl(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_examples(
    out_dir: str | Path, seed: int = DEFAULT_SEED, scale: float = 1.0, num_heldout: int = NUM_HELDOUT
) -> list[Path]:
    """Write `data/<task>/train.jsonl` and `heldout/<task>.jsonl` under `out_dir`.

    Args:
        out_dir: root folder (the repository's is `examples/`).
        seed: global seed.
        scale: multiplier on every task's train size.
        num_heldout: held-out records per task.

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    written = []
    for task, (train, heldout) in generate_all(seed, scale, num_heldout).items():
        for path, records in (
            (out_dir / "data" / task / "train.jsonl", train),
            (out_dir / "heldout" / f"{task}.jsonl", heldout),
        ):
            _write_jsonl(path, records)
            written.append(path)
    return written
