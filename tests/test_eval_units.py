"""Evaluation pieces against independent expectations: pass@k by enumeration, records, prompts, programs."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import pytest

from mftune.config import ConfigError, validate_config
from mftune.config.eval_schema import PromptConfig
from mftune.eval.metrics import mean_and_stderr, normalise, pass_at_k
from mftune.eval.problems import ProblemError, parse_problem, read_problems
from mftune.eval.prompts import (
    CODE_STOPS,
    build_program,
    build_prompt,
    cut_at_stops,
    extract_code,
)


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_equals_enumerating_every_k_subset(n: int) -> None:
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_pass_at_k_stays_finite_where_binomials_overflow() -> None:
    # C(2000, 1000) overflows a float; the product form does not.
    value = pass_at_k(2000, 3, 1000)
    expected = 1 - math.comb(1997, 1000) / math.comb(2000, 1000)
    assert value == pytest.approx(expected, rel=1e-9)


def test_mean_and_stderr_match_the_statistics_module() -> None:
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    mean, stderr = mean_and_stderr(values)
    assert mean == statistics.mean(values)
    assert stderr == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert mean_and_stderr([0.5]) == (0.5, None)


def test_normalise_only_folds_what_it_is_told() -> None:
    assert normalise("  Hi  there \n") == "Hi  there"
    assert normalise("  Hi  there \n", collapse_whitespace=True) == "Hi there"
    assert normalise("HI", case_sensitive=False) == normalise("hi")
    assert normalise("HI") != normalise("hi")


# Records.


def test_record_kinds_are_told_apart_by_their_fields() -> None:
    human = parse_problem(
        "t",
        {"task_id": "X/0", "prompt": "def f():\n", "test": "def check(c): pass", "entry_point": "f"},
        "f:1",
    )
    assert (human.kind, human.id, human.entry_point) == ("humaneval", "X/0", "f")
    assert human.tests.endswith("check(f)\n")
    mbpp = parse_problem(
        "t", {"text": "Add.", "test_list": ["assert add(1, 2) == 3"], "test_setup_code": "import math"}, "f:2"
    )
    assert (mbpp.kind, mbpp.prompt, mbpp.setup, mbpp.test_list) == (
        "mbpp",
        "Add.",
        "import math",
        ("assert add(1, 2) == 3",),
    )
    chat = parse_problem(
        "t", {"messages": [{"role": "user", "content": "Write f."}], "tests": ["assert f() == 1"]}, "f:3"
    )
    assert (chat.kind, chat.tests) == ("chat_tests", "assert f() == 1\n")
    answer = parse_problem("t", {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}, "f:4")
    assert (answer.kind, answer.answer, answer.messages) == (
        "answer",
        "2",
        ({"role": "user", "content": "1+1?"},),
    )
    # A training record: its last assistant turn is the answer, and the prompt what comes before it.
    rounds = {"chat_rounds": [{"role": "human", "content": "2+2?"}, {"role": "bot", "content": "4"}]}
    trained = parse_problem("t", rounds, "f:5")
    assert (trained.answer, trained.messages) == ("4", ({"role": "user", "content": "2+2?"},))
    bare = parse_problem("t", {"prompt": "Say hi.", "answer": "hi"}, "f:6")
    assert (bare.answer, bare.messages[-1]["content"]) == ("hi", "Say hi.")  # fmt: skip


def test_every_bad_record_is_named_by_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"text": "x", "test_list": "assert True"},
        "not json",
        {"messages": [{"role": "user", "content": "fine"}], "answer": "ok"},
    ]
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(ProblemError) as err:
        read_problems("t", path)
    text = str(err.value)
    assert f"{path}:1: field 'answer'" in text
    assert f"{path}:2: field 'test_list'" in text
    assert f"{path}:3: invalid JSON" in text
    assert ":4" not in text and len(err.value.errors) == 3


def test_eval_config_refuses_k_above_n_and_identical_greedy_samples() -> None:
    base = {"model": {"name_or_path": "m"}, "data": {"tasks": {"a": {"path": "/tmp"}}}}

    def task(**pass_at_k) -> dict:
        return {**base, "eval": {"tasks": {"h": {"benchmark": "humaneval", "pass_at_k": pass_at_k}}}}

    with pytest.raises(ConfigError, match=r"eval\.tasks\.h\.pass_at_k\.k: every k must be in \[1, n = 5\]"):
        validate_config(task(n=5, k=[1, 10], temperature=0.8))
    with pytest.raises(ConfigError, match=r"eval\.tasks\.h\.pass_at_k\.n: .*set a temperature"):
        validate_config(task(n=5, k=[1]))
    with pytest.raises(ConfigError, match=r"eval\.tasks\.h\.path: set path or benchmark"):
        validate_config({**base, "eval": {"tasks": {"h": {"benchmark": "humaneval", "path": "x.jsonl"}}}})


# Prompts and programs.

HUMANEVAL = parse_problem(
    "he",
    {
        "task_id": "T/0",
        "prompt": 'from typing import List\n\n\ndef double(xs: List[int]) -> List[int]:\n    """Double each."""\n',
        "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n",
        "entry_point": "double",
    },
    "he:1",
)


def test_chat_prompts_wrap_code_problems_and_keep_conversations() -> None:
    chat = build_prompt(HUMANEVAL, PromptConfig(), "chat")
    assert chat.messages[-1]["role"] == "user" and HUMANEVAL.prompt in chat.messages[-1]["content"]
    assert chat.stop == ()
    custom = build_prompt(HUMANEVAL, PromptConfig(instruction="Finish {prompt}!", system="Be exact."), "chat")
    assert custom.messages == (
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": f"Finish {HUMANEVAL.prompt}!"},
    )
    record = parse_problem("t", {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}, "f:1")
    assert build_prompt(record, PromptConfig(), "chat").messages == record.messages


def test_completion_prompts_are_the_raw_prompt_and_stop_at_top_level_statements() -> None:
    completion = build_prompt(HUMANEVAL, PromptConfig(), "completion")
    assert completion.text == HUMANEVAL.prompt and completion.stop == tuple(CODE_STOPS)
    body = "    return [2 * x for x in xs]\n\n\ndef unrelated():\n    pass\n"
    assert cut_at_stops(body, completion.stop) == "    return [2 * x for x in xs]\n\n"
    assert build_prompt(HUMANEVAL, PromptConfig(stop=["END"]), "completion").stop == ("END",)


def test_code_is_taken_from_the_first_python_block() -> None:
    reply = "Sure.\n```text\nnot code\n```\n```python\ndef f():\n    return 1\n```\nDone."
    assert extract_code(reply, "auto") == "def f():\n    return 1\n"
    assert extract_code("no fence at all", "auto") == "no fence at all"
    assert extract_code("no fence at all", "fenced") == ""
    assert extract_code("```py\nx = 1", "fenced") == "x = 1"  # cut off before its closing fence
    assert extract_code(reply, "none") == reply


def _runs(program: str) -> bool:
    namespace: dict = {}
    try:
        exec(compile(program, "<program>", "exec"), namespace)  # trusted test code, not a model's
    except AssertionError:
        return False
    return True


def test_programs_run_the_tests_on_what_the_model_wrote() -> None:
    whole = "```python\ndef double(xs):\n    return [x * 2 for x in xs]\n```"
    assert _runs(build_program(HUMANEVAL, whole, "chat", "auto"))
    body_only = "```python\n    return [x * 2 for x in xs]\n```"
    assert _runs(build_program(HUMANEVAL, body_only, "chat", "auto"))
    assert not _runs(build_program(HUMANEVAL, "    return xs\n", "completion", "none"))
    assert _runs(build_program(HUMANEVAL, "    return [x + x for x in xs]\n", "completion", "none"))
    mbpp = parse_problem("t", {"text": "Add.", "test_list": ["assert add(1, 2) == 3"]}, "f:1")
    assert _runs(build_program(mbpp, "```python\ndef add(a, b):\n    return a + b\n```", "chat", "auto"))
    assert not _runs(build_program(mbpp, "def add(a, b):\n    return a - b\n", "completion", "none"))
