"""The backend check (`benchmarks/backends.py`): run end to end on the CPU (`--smoke`: `single` through
`mftune train` and `ddp` over 2 gloo processes through `mftune launch`, LoRA, resumed from half way), and its
comparisons, command lines and tables on hand-made inputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import backend_checks as checks  # benchmarks/ is on pytest's path (pyproject.toml)
import backends
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "backends.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """The JSON report and stdout of `backends.py check --smoke`."""
    tmp = tmp_path_factory.mktemp("backends")
    argv = [sys.executable, str(SCRIPT), "check", "--smoke"]
    argv += ["--workdir", str(tmp / "work"), "--out", str(tmp / "results.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "results.json").read_text()), proc.stdout


def test_smoke_rows_all_pass(smoke) -> None:
    report, stdout = smoke
    rows = {(r["backend"], r["method"]): r for r in report["results"]}
    assert list(rows) == [("single", "lora"), ("ddp", "lora")]
    for r in rows.values():
        assert r["status"] == "ok" and r["train_ok"] and not r["problems"], r
        assert r["resume"]["ok"] and r["resume"]["max_diff"] == 0.0  # float32 on CPU: exactly equal
        assert r["merge"]["ok"] and r["merge"]["max_diff"] <= 1e-4
    assert rows["ddp", "lora"]["processes"] == 2
    assert rows["ddp", "lora"]["loss_diff"] <= 1e-4
    assert "| single | lora | yes | yes (Δ 0) | yes (Δ " in stdout
    assert "| ddp | lora | yes | yes (Δ 0) | yes (Δ " in stdout


def test_measure_smoke_reports_throughput_from_the_run_metrics(tmp_path) -> None:
    """`measure --smoke`, `single` only: the data, model and summaries of benchmarks/throughput.py."""
    argv = [sys.executable, str(SCRIPT), "measure", "--smoke", "--backends", "single"]
    argv += ["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "results.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["device"] and report["versions"]["torch"] and report["shape"] == "tiny"
    [row] = report["results"]
    assert (row["backend"], row["method"], row["status"]) == ("single", "lora", "ok")
    assert row["steps_logged"] == 3 and row["timed_steps"] == 2  # --smoke: 1 warm-up + 2 timed steps
    assert row["tokens"] > 0 and row["tps"] == pytest.approx(row["tokens"] / row["seconds"])
    assert "| single | lora | 1 | " in proc.stdout


# --- the resume comparison on hand-made metrics ------------------------------------------------------


def _rows(losses: list[float], valid: float = 5.0, seconds: float = 0.1) -> list[dict]:
    """metrics.jsonl rows of a run: the step-0 validation, one line per step, validation at the end."""
    rows = [{"step": 0, "valid/loss": 8.0}]
    rows += [{"step": s, "train/loss": v, "train/seconds": seconds} for s, v in enumerate(losses, 1)]
    rows.append({"step": len(losses), "valid/loss": valid})
    return rows


STRAIGHT = _rows([8.3, 8.1, 7.9, 7.6])


def _continued(losses: list[float], **kwargs) -> list[dict]:
    """The straight run's lines up to step 2, then what a run resumed from step 2 logged."""
    return STRAIGHT[:3] + _rows(losses, **kwargs)[3:]


def test_compare_resumed_accepts_an_exact_continuation():
    verdict = checks.compare_resumed(STRAIGHT, _continued([8.3, 8.1, 7.9, 7.6]), 2, tol=0.0)
    assert verdict == {"ok": True, "max_diff": 0.0, "problems": []}


@pytest.mark.parametrize(
    ("resumed", "tol", "expected"),
    [
        (_continued([8.3, 8.1, 7.9, 7.7]), 0.0, "differ by up to 0.1"),  # a later loss differs
        (_continued([8.3, 8.1, 7.9, 7.6], valid=5.2), 0.0, "differ by up to 0.2"),  # validation differs
        (_continued([8.3, 8.1, 7.9, 7.6 + 1e-3]), 1e-4, "differ by up to 0.001"),  # over the tolerance
        (_continued([8.3, 8.1, 7.9, math.nan]), 1.0, "differ by up to nan"),
        (_rows([8.3, 8.1, 7.9, 7.6], seconds=0.2), 0.0, "were rewritten"),  # started over from step 0
        (_continued([8.3, 8.1, 7.9]), 0.0, "logged train steps [1, 2, 3]"),  # stopped early
        (STRAIGHT[:3] + STRAIGHT[2:], 0.0, "logged train steps [1, 2, 2, 3, 4]"),  # a step logged twice
        (STRAIGHT[:3], 0.0, "no loss logged after step 2"),
    ],
)
def test_compare_resumed_fails_when_the_resumed_run_differs(resumed, tol, expected):
    verdict = checks.compare_resumed(STRAIGHT, resumed, 2, tol=tol)
    assert not verdict["ok"]
    assert any(expected in problem for problem in verdict["problems"]), verdict["problems"]


def test_compare_resumed_accepts_differences_within_the_tolerance():
    verdict = checks.compare_resumed(STRAIGHT, _continued([8.3, 8.1, 7.9, 7.6 + 1e-3]), 2, tol=2e-3)
    assert verdict["ok"] and verdict["max_diff"] == pytest.approx(1e-3)


def test_loss_difference_against_single():
    assert checks.loss_difference(STRAIGHT, STRAIGHT) == 0.0
    assert checks.loss_difference(_rows([8.3, 8.0, 7.9, 7.6]), STRAIGHT) == pytest.approx(0.1)
    assert checks.loss_difference(_rows([8.3, 8.1, 7.9]), STRAIGHT) == math.inf  # other steps


# --- command lines, skips and tables -----------------------------------------------------------------


def test_single_trains_in_one_process_and_the_others_launch():
    config, overrides = Path("c.yaml"), ["train.output_dir=/x"]
    single = checks.train_command("single", config, overrides, processes=4)
    assert single == [sys.executable, "-m", "mftune.cli", "train", "c.yaml", "train.output_dir=/x"]
    zero3 = checks.train_command("zero3", config, overrides, processes=4)
    assert zero3[:5] == [sys.executable, "-m", "mftune.cli", "launch", "c.yaml"]
    assert zero3[5:9] == ["--accelerate", "zero3", "--num-processes", "4"]
    assert zero3[9] == "--main-process-port" and zero3[-1] == "train.output_dir=/x"


def test_skip_reasons(monkeypatch):
    real = checks.util.find_spec
    monkeypatch.setattr(checks.util, "find_spec", lambda name: None if name == "deepspeed" else real(name))
    assert checks.skip_reason("zero2-offload", gpus=8, processes=2) == (
        "deepspeed not installed (pip install deepspeed)"
    )
    assert "needs CUDA GPUs" in checks.skip_reason("fsdp", gpus=0, processes=1)
    assert checks.skip_reason("fsdp", gpus=1, processes=2) == "needs 2 GPUs, 1 here"
    assert checks.skip_reason("ddp", gpus=0, processes=2) is None  # gloo on CPUs
    assert checks.skip_reason("single", gpus=0, processes=8) is None


def test_check_table_shows_failures_and_skips():
    tol = checks.Tolerances(loss=0.05, resume=2e-3, logits=1e-4)
    ok = {"ok": True, "max_diff": 0.0, "problems": []}
    rows = [
        {"backend": "single", "method": "full", "status": "ok", "train_ok": True, "resume": ok, "merge": ok,
         "wall_s": 3.0},
        {"backend": "fsdp", "method": "full", "status": "FAIL", "train_ok": True, "wall_s": 4.25,
         "resume": {"ok": False, "max_diff": 0.3, "problems": ["..."]}, "merge": ok, "loss_diff": 0.5},
        {"backend": "zero3", "method": "full", "status": "skipped", "reason": "deepspeed not installed"},
    ]  # fmt: skip
    lines = backends.check_table(rows, tol).splitlines()
    assert lines[2] == "| single | full | yes | yes (Δ 0) | yes (Δ 0) | reference | 3.0 |"
    assert lines[3] == "| fsdp | full | yes | NO (Δ 0.3) | yes (Δ 0) | 0.5 (over 0.05) | 4.2 |"
    assert lines[4] == "| zero3 | full | skipped: deepspeed not installed | - | - | - | - |"


def test_measure_table_compares_with_single():
    rows = [
        {"backend": "single", "method": "lora", "processes": 1, "status": "ok", "tps": 2000.0,
         "tps_per_gpu": 2000.0, "peak_gib": 20.0, "wall_s": 60.0},
        {"backend": "zero3-offload", "method": "lora", "processes": 1, "status": "ok", "tps": 1000.0,
         "tps_per_gpu": 1000.0, "peak_gib": 5.0, "wall_s": 90.0},
        {"backend": "fsdp", "method": "lora", "processes": 1, "status": "OOM", "error": "CUDA out of memory"},
    ]  # fmt: skip
    lines = backends.measure_table(rows).splitlines()
    assert lines[2] == "| single | lora | 1 | 2,000 | 2,000 | 20.0 | 1.00 | 1.00 | 60.0 |"
    assert lines[3] == "| zero3-offload | lora | 1 | 1,000 | 1,000 | 5.0 | 0.50 | 0.25 | 90.0 |"
    assert lines[4] == "| fsdp | lora | 1 | OOM: CUDA out of memory | - | - | - | - | - |"
