"""The GPU session script (`benchmarks/gpu_session.sh`): its whole sequence on the CPU (`--smoke`), its
time budget, and its goals on hand-made results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import gpu_session as session
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """The JSON report, the output folder and the stdout of `gpu_session.sh --smoke`."""
    tmp = tmp_path_factory.mktemp("gpu-session")
    out = tmp / "out"
    argv = [
        "bash",
        str(BENCHMARKS / "gpu_session.sh"),
        "--smoke",
        "--out",
        str(out),
        "--workdir",
        str(tmp / "work"),
    ]
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OUT", None)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_session.json").read_text()), out, proc.stdout


def test_smoke_runs_every_part_in_order(smoke) -> None:
    report, out, stdout = smoke
    parts = [line.split(":")[0] for line in stdout.splitlines() if line.startswith("== ")]
    assert parts == [
        "== wheels",
        "== environment",
        "== checks",
        "== throughput 0.5b",
        "== throughput 1.5b",
        "== throughput 7b",
    ]
    assert report["environment"]["versions"]["torch"] and report["environment"]["date"]
    assert report["failed"] == [] and report["elapsed_s"] < report["budget_s"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_session.json", "gpu_session.md", "logs.tar.gz"]
    assert (out / "gpu_session.md").read_text() in stdout  # the report printed is the report written


def test_smoke_runs_the_gpu_tests_which_skip_without_cuda(smoke) -> None:
    import torch

    cases = smoke[0]["tests"]["cases"]
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    listed = subprocess.run(
        [*argv, str(REPO / "tests")], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    gpu_tests = {line for line in listed.stdout.splitlines() if "::" in line}
    assert len(gpu_tests) >= 5
    # junit names a test `tests.test_gpu::name[param]`, the collection `tests/test_gpu.py::name[param]`.
    assert {c["test"].replace(".", "/", 1).replace("::", ".py::", 1) for c in cases} == gpu_tests
    if not torch.cuda.is_available():
        assert {c["outcome"] for c in cases} == {"skipped"}
        assert all("CUDA" in c["message"] for c in cases)


def test_smoke_checks_every_backend(smoke) -> None:
    rows = {r["backend"]: r for r in smoke[0]["backends"]["results"]}
    assert list(rows) == ["single", "zero2", "zero3", "fsdp"]
    assert (
        rows["single"]["status"] == "ok" and rows["single"]["resume"]["ok"] and rows["single"]["merge"]["ok"]
    )
    for name in ("zero2", "zero3", "fsdp"):  # on a CPU: skipped, with the reason
        assert rows[name]["status"] == "skipped" and rows[name]["reason"]
        assert any(line.startswith(f"backend {name} lora: ") for line in smoke[0]["not_measured"])


def test_smoke_measures_each_grid(smoke) -> None:
    grids = smoke[0]["throughput"]
    assert list(grids) == ["0.5b", "1.5b", "7b"]
    cases = {(r["method"], r["side"], r["setting"]): r for r in grids["0.5b"]["results"]}
    # Defaults of both methods first, then the fastest settings.
    assert list(cases) == [
        (method, side, setting)
        for setting in ("default", "fastest")
        for method in ("full", "lora")
        for side in ("mftune", "trl")
    ]
    for (_, side, setting), r in cases.items():
        if side == "mftune":
            assert r["status"] == "ok" and r["tps"] > 0
            assert r["micro_batch"] == (4 if setting == "fastest" else 1)  # --fastest-micro mftune=4
        else:
            assert r["status"] in ("ok", "skipped")
            assert r["status"] == "ok" or r["error"] == "trl or datasets not installed"
    (mfu,) = grids["1.5b"]["results"]
    assert (mfu["method"], mfu["setting"], mfu["status"], mfu["micro_batch"]) == ("full", "fastest", "ok", 2)
    (qlora,) = grids["7b"]["results"]
    assert (qlora["method"], qlora["setting"], qlora["status"]) == ("qlora", "default", "ok")
    assert qlora["accumulation"] == 1 and qlora["tokens"] / qlora["timed_steps"] <= 256  # one row per step


def test_smoke_goals_are_read_off_the_measurements(smoke) -> None:
    report = smoke[0]
    goals = {g["goal"]: g for g in report["goals"]}
    assert len(goals) == 8
    cases = {
        (r["method"], r["setting"]): r
        for r in report["throughput"]["0.5b"]["results"]
        if r["side"] == "mftune"
    }
    for setting in ("default", "fastest"):
        goal = goals[f"0.5b, mftune at its {setting}: LoRA faster than full fine-tuning"]
        assert goal["met"] == (cases["lora", setting]["tps"] > cases["full", setting]["tps"])
    assert goals["7b QLoRA at 4,096 tokens: peak ≤ 10 GiB"]["met"] is None  # no CUDA memory on a CPU


def test_smoke_keeps_every_log(smoke) -> None:
    with tarfile.open(smoke[1] / "logs.tar.gz") as tar:
        names = tar.getnames()
    for log in ("environment", "pytest", "backends", "throughput-0.5b", "throughput-1.5b", "throughput-7b"):
        assert f"logs/{log}.log" in names
    assert any(n.startswith("throughput-0.5b/logs/tiny-full-mftune-default") for n in names)  # a case's own


def test_each_part_keeps_what_the_later_parts_reserve() -> None:
    parts = (session.Part("a", 100, 10), session.Part("b", 50, 30), session.Part("c", 60, 20))
    # Early: each part is held to its own budget.
    assert session.part_deadline("a", now=0, end=200, parts=parts) == 100
    assert session.part_deadline("b", now=0, end=200, parts=parts) == 50
    # Late: what b and c reserve (50 s) is kept, and c's reserve (20 s) while b runs.
    assert session.part_deadline("a", now=120, end=200, parts=parts) == 150
    assert session.part_deadline("b", now=150, end=200, parts=parts) == 180
    # The last part may use all that is left, up to its budget.
    assert session.part_deadline("c", now=180, end=200, parts=parts) == 200
    assert session.part_deadline("c", now=100, end=200, parts=parts) == 160


def test_speed_goals_need_both_numbers() -> None:
    def row(method: str, side: str, setting: str, **values) -> dict:
        return {"method": method, "side": side, "setting": setting, "status": "ok", "tps": 100.0, **values}

    throughput = {
        "0.5b": {
            "results": [
                row("full", "mftune", "default", speed_vs_trl=2.5, memory_vs_trl=0.8),
                row("lora", "mftune", "default", speed_vs_trl=2.5, memory_vs_trl=1.2),
                row("full", "mftune", "fastest", speed_vs_trl=2.4),
                {**row("lora", "mftune", "fastest"), "status": "OOM"},
            ]
        },
        "1.5b": {"results": [row("full", "mftune", "fastest", mfu=0.55)]},
    }
    met = {g["goal"].split(":")[0]: g["met"] for g in session.goals(throughput, matmul_tflops=790.0)}
    assert met["0.5b full, both sides at their default"] is True
    assert met["0.5b lora, both sides at their default"] is False  # faster, but more memory
    assert met["0.5b full, both sides at their fastest"] is False
    assert met["0.5b lora, both sides at their fastest"] is None  # it ran out of memory: not measured
    assert met["1.5b full fine-tune"] is True
    assert met["7b QLoRA at 4,096 tokens"] is None
    mfu = next(g for g in session.goals(throughput, 790.0) if g["goal"].startswith("1.5b"))
    # 0.55 x 989 / 790 = 0.6885
    assert "55.0% of 989 TFLOP/s" in mfu["measured"] and "(68.9% of the measured 790)" in mfu["measured"]


def test_throughput_skips_cases_past_its_time_budget(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        str(BENCHMARKS / "throughput.py"),
        "--smoke",
        "--sides",
        "mftune",
        "--methods",
        "lora",
    ]
    argv += ["--time-budget", "0.01", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "r.json")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert len(results) == 2 and all(r["status"] == "skipped" for r in results)
    assert all(r["error"].startswith("time budget: ") for r in results)
