"""The data of the multi-task quality study: the five tasks, and the corpus the base is pre-trained on.

Tasks: the four bundled ones of `mftune.tiny.examples` (exact answers), plus `write_code`, a code task
scored by running tests: a description such as "returns the sum of the elements of xs greater than 4"
answered by a multi-line function, checked by three asserts whose expected values come from running the
reference solution. Its held-out records are chat records with `tests` (`mftune eval` scores them by
pass@1 in its sandbox); its training records end with the reference solution.

The corpus is plain text in mftune's `text` format: expressions with their values, list operations
with their results, described one-line functions, functions with a test, and the multi-line functions
of `write_code` with a test each, all drawn from the same generators with other random draws. No
held-out problem of seeds 0-9 appears in it, so pre-training teaches the skills and never the answers.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mftune.tiny import examples

TASKS = ("arithmetic", "list_ops", "write_function", "write_test", "write_code")
CODE_TASK = "write_code"
CODE_TRAIN_SIZE = 400  # between write_function (600) and write_test (250); arithmetic has 3000
EXCLUDED_SEEDS = range(10)  # the corpus never holds a held-out problem of these seeds


@dataclass(frozen=True)
class CodeFamily:
    """A multi-line function family: `{name}`, `{c}` (an int) and `{ch}` (a letter) are filled in."""

    params: str
    describes: str
    body: str
    constants: range | None = None


_F = CodeFamily
CODE_FAMILIES = (
    _F("xs", "the sum of the elements of xs greater than {c}",
       "    total = 0\n    for x in xs:\n        if x > {c}:\n            total += x\n    return total", range(0, 10)),
    _F("xs", "the elements of xs divisible by {c}",
       "    result = []\n    for x in xs:\n        if x % {c} == 0:\n            result.append(x)\n    return result",
       range(2, 6)),
    _F("xs", "the product of the elements of xs",
       "    product = 1\n    for x in xs:\n        product *= x\n    return product"),
    _F("xs", "the number of even elements in xs",
       "    count = 0\n    for x in xs:\n        if x % 2 == 0:\n            count += 1\n    return count"),
    _F("xs", "the running totals of xs",
       "    totals = []\n    running = 0\n    for x in xs:\n        running += x\n        totals.append(running)\n"
       "    return totals"),
    _F("xs", "the index of the largest element of xs",
       "    best = 0\n    for i in range(len(xs)):\n        if xs[i] > xs[best]:\n            best = i\n    return best"),
    _F("xs", "xs with every element increased by {c}, in reverse order",
       "    result = []\n    for x in reversed(xs):\n        result.append(x + {c})\n    return result", range(1, 10)),
    _F("s", "the number of times the letter '{ch}' occurs in s",
       "    count = 0\n    for letter in s:\n        if letter == '{ch}':\n            count += 1\n    return count"),
    _F("s", "s with every letter '{ch}' removed",
       "    kept = []\n    for letter in s:\n        if letter != '{ch}':\n            kept.append(letter)\n"
       "    return ''.join(kept)"),
    _F("s", "True if s reads the same backwards, else False",
       "    for i in range(len(s) // 2):\n        if s[i] != s[len(s) - 1 - i]:\n            return False\n"
       "    return True"),
)  # fmt: skip
_CODE_PHRASES = (
    "Write a Python function `{sig}` that returns {what}.",
    "Implement `{sig}`: it returns {what}.",
)


@dataclass(frozen=True)
class CodeProblem:
    key: str
    instruction: str
    solution: str
    tests: tuple[str, ...]


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase[:6]) for _ in range(rng.randint(3, 7)))


def _inputs(rng: random.Random, params: str) -> object:
    if params == "s":
        word = _letters(rng)
        return word + word[::-1] if rng.random() < 0.3 else word  # palindromes now and then
    return [rng.randint(0, 12) for _ in range(rng.randint(2, 6))]


def code_problem(rng: random.Random) -> CodeProblem:
    """A `write_code` problem: description, reference solution, and three asserts it passes."""
    family = rng.choice(CODE_FAMILIES)
    name = rng.choice(examples.FUNCTION_NAMES)
    c = rng.choice(family.constants) if family.constants else 0
    ch = rng.choice(string.ascii_lowercase[:6])
    sig = f"{name}({family.params})"
    what = family.describes.format(c=c, ch=ch)
    solution = f"def {sig}:\n" + family.body.format(c=c, ch=ch)
    namespace: dict = {}
    exec(solution, namespace)  # our own generated code: running it gives the expected values
    tests = []
    for _ in range(3):
        value = _inputs(rng, family.params)
        tests.append(f"assert {name}({value!r}) == {namespace[name](value)!r}")
    instruction = rng.choice(_CODE_PHRASES).format(sig=sig, what=what)
    return CodeProblem(solution, instruction, solution, tuple(tests))


def _code_draws(rng: random.Random, count: int, seen: set[str]) -> list[CodeProblem]:
    problems, attempts = [], 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count:
            raise ValueError(f"write_code ran out of distinct problems after {len(problems)}")
        p = code_problem(rng)
        if p.key not in seen:
            seen.add(p.key)
            problems.append(p)
    return problems


def code_task(num_train: int, num_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`write_code`'s train records (messages ending with the solution) and held-out records (with tests)."""
    rng = random.Random(f"{seed}:{CODE_TASK}")
    seen: set[str] = set()
    heldout = [
        {"task": CODE_TASK, "messages": [{"role": "user", "content": p.instruction}], "tests": list(p.tests)}
        for p in _code_draws(rng, num_heldout, seen)
    ]
    train = [
        {
            "messages": [
                {"role": "user", "content": p.instruction},
                {"role": "assistant", "content": p.solution},
            ]
        }
        for p in _code_draws(rng, num_train, seen)
    ]
    return train, heldout


def write_tasks(root: Path, seed: int, scale: float, num_heldout: int) -> dict[str, int]:
    """Write every task's `data/<task>/train.jsonl` and `heldout/<task>.jsonl` under `root`.

    Returns:
        Train records per task.
    """
    examples.write_examples(root, seed=seed, scale=scale, num_heldout=num_heldout)
    train, heldout = code_task(max(1, round(CODE_TRAIN_SIZE * scale)), num_heldout, seed)
    _write(root / "data" / CODE_TASK / "train.jsonl", train)
    _write(root / "heldout" / f"{CODE_TASK}.jsonl", heldout)
    sizes = {t: max(1, round(n * scale)) for t, n in examples.TASK_SIZES.items()}
    return {**sizes, CODE_TASK: len(train)}


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


# --- the pre-training corpus ------------------------------------------------------------------------

_BACKTICKS = re.compile(r"`([^`]+)`")


def heldout_keys(num_heldout: int) -> set[str]:
    """What identifies a held-out problem of seeds 0-9: expressions, expected answers and code."""
    keys: set[str] = set()
    for seed in EXCLUDED_SEEDS:
        for task in examples.TASK_SIZES:
            _, heldout = examples.generate_task(task, 0, num_heldout, seed)
            for record in heldout:
                keys.update(_BACKTICKS.findall(record["messages"][-1]["content"]))
                keys.add(record["answer"])
        _, code = code_task(0, num_heldout, seed)
        keys.update(r["messages"][-1]["content"] for r in code)
    return keys


def _corpus_drawer(rng: random.Random, excluded: set[str]) -> Callable[[], str | None]:
    """A drawer of one corpus document at a time (None when the draw hit a held-out problem)."""
    render = {
        "arithmetic": lambda p: f">>> {p.key}\n{p.answer}",
        "list_ops": lambda p: f">>> {p.key}\n{p.answer}",
        "write_function": lambda p: f"# {p.instruction}\n{p.answer}",
        "write_test": lambda p: f"{p.input}\n{p.answer}",
    }
    generators = examples._PROBLEMS  # the bundled tasks' own problem generators
    answers_identify = ("write_function", "write_test")  # an arithmetic answer ("11") identifies nothing

    def draw() -> str | None:
        kind = rng.choice((*render, CODE_TASK))
        if kind == CODE_TASK:
            p = code_problem(rng)
            if p.instruction in excluded or p.key in excluded:
                return None
            return f'"""{p.instruction}"""\n{p.solution}\n{p.tests[0]}'
        problem = generators[kind](rng)
        if problem.key in excluded or (kind in answers_identify and problem.answer in excluded):
            return None
        return render[kind](problem)

    return draw


def write_corpus(path: Path, records: int, seed: int, num_heldout: int) -> int:
    """Write `records` text records of eight documents each to `path`; the number written."""
    draw = _corpus_drawer(random.Random(f"corpus:{seed}"), heldout_keys(num_heldout))
    out, buffer = [], []
    while len(out) < records:
        doc = draw()
        if doc is None:
            continue
        buffer.append(doc)
        if len(buffer) == 8:  # several documents per record, so packing sees varied neighbours
            out.append({"text": "\n\n".join(buffer)})
            buffer = []
    _write(path, out)
    return len(out)
