"""The GPU throughput benchmark, run end to end on the CPU (`--smoke`): its cases, and that the mftune
side really trained through `mftune.train.loop.train` with the settings each case names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
WARMUP, STEPS, TOKENS_PER_STEP = 1, 2, 1024  # --smoke's sizes


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The JSON report of `throughput.py --smoke` with the mftune and plain sides, LoRA."""
    tmp = tmp_path_factory.mktemp("throughput")
    argv = [sys.executable, str(SCRIPT), "--smoke", "--sides", "mftune", "plain", "--methods", "lora"]
    argv += ["--workdir", str(tmp / "work"), "--out", str(tmp / "results.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| tiny | lora |" in proc.stdout  # the table was printed
    return json.loads((tmp / "results.json").read_text())


def test_one_result_per_case_with_positive_throughput(smoke: dict) -> None:
    cases = sorted((r["side"], r["setting"]) for r in smoke["results"])
    assert cases == [("mftune", "default"), ("mftune", "fastest"), ("plain", "baseline")]
    for r in smoke["results"]:
        assert r["status"] == "ok", r
        assert r["timed_steps"] == STEPS and r["steps_logged"] == WARMUP + STEPS
        assert r["tokens"] > 0 and r["tps"] > 0 and r["mfu"] > 0
        assert r["flops_per_token"] > 4 * 1e5  # 4·N of a ~0.3M-parameter model, plus attention


def test_mftune_trained_through_its_loop_with_each_setting(smoke: dict) -> None:
    mftune = {r["setting"]: r for r in smoke["results"] if r["side"] == "mftune"}
    for setting, checkpointing, micro in (("default", True, 1), ("fastest", False, 2)):
        r = mftune[setting]
        # What the loaded model really ran with, seen inside `train`.
        assert r["gradient_checkpointing"] is checkpointing
        assert r["attention"] == "sdpa"  # `auto` on a CPU
        assert r["micro_batch"] == micro and r["accumulation"] == 4 // micro
        rows = [json.loads(line) for line in Path(r["metrics_path"]).read_text().splitlines()]
        train_rows = [row for row in rows if "tokens_per_second" in row]
        assert [row["step"] for row in train_rows] == list(range(1, WARMUP + STEPS + 1))
        assert all(row["train/synthetic/tokens"] > 0 for row in train_rows)
        # Real tokens of packed rows: at most the step's capacity, and most of it.
        per_step = r["tokens"] / r["timed_steps"]
        assert 0.8 * TOKENS_PER_STEP <= per_step <= TOKENS_PER_STEP


def test_mftune_trains_adapters_only(smoke: dict) -> None:
    sides = {(r["side"], r["setting"]): r for r in smoke["results"]}
    for r in sides.values():
        assert 0 < r["trainable_parameters"] < 0.5 * smoke["models"]["tiny"]["total"]
    assert (
        sides["mftune", "default"]["trainable_parameters"]
        == sides["plain", "baseline"]["trainable_parameters"]
    )
