"""The GPU session's report (benchmarks/gpu_session.py): the performance goals read off the throughput
grids, what did not run and why, what failed, and the whole session as markdown."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from backend_checks import Tolerances
from backends import check_table
from throughput import NOT_FAILURES, table
from workload import MFU_FORMULA

DATASHEET_TFLOPS = 989.0  # dense bf16, H100 and H200 SXM
LOG_LINES = 400  # kept of each log in logs.tar.gz


def goals(throughput: dict, matmul_tflops: float | None) -> list[dict]:
    """The performance goals: each with what was measured and whether it was met (None: not measured).

    Args:
        throughput: each grid's report, by grid name (`0.5b`, `1.5b`, `7b`).
        matmul_tflops: the measured bf16 matmul rate, to give MFU against it beside the datasheet's.
    """

    def ok(grid: str, method: str, side: str, setting: str) -> dict | None:
        for r in throughput.get(grid, {}).get("results", []):
            if (r["method"], r["side"], r["setting"]) == (method, side, setting) and r["status"] == "ok":
                return r
        return None

    found = []
    for setting, target in (("default", 2.0), ("fastest", 2.5)):
        for method in ("full", "lora"):
            row = ok("0.5b", method, "mftune", setting) or {}
            speed, memory = row.get("speed_vs_trl"), row.get("memory_vs_trl")
            goal = f"0.5b {method}, both sides at their {setting}: mftune ≥ {target:g}× TRL's tok/s"
            verdicts = [None if speed is None else speed >= target]
            if setting == "default":
                goal += ", with no more peak memory"
                verdicts.append(None if memory is None else memory <= 1)
            measured = "-" if speed is None else f"{speed:.2f}× tok/s, {_ratio(memory)} memory"
            found.append(_goal(goal, measured, _all_met(verdicts)))
    for setting in ("default", "fastest"):
        full, lora = ok("0.5b", "full", "mftune", setting), ok("0.5b", "lora", "mftune", setting)
        found.append(
            _goal(
                f"0.5b, mftune at its {setting}: LoRA faster than full fine-tuning",
                f"LoRA {lora['tps']:,.0f}, full {full['tps']:,.0f} tok/s" if full and lora else "-",
                lora["tps"] > full["tps"] if full and lora else None,
            )
        )
    mfu = (ok("1.5b", "full", "mftune", "fastest") or {}).get("mfu")
    measured = "-" if mfu is None else f"{mfu:.1%} of {DATASHEET_TFLOPS:g} TFLOP/s"
    if mfu is not None and matmul_tflops:
        measured += f" ({mfu * DATASHEET_TFLOPS / matmul_tflops:.1%} of the measured {matmul_tflops:.0f})"
    found.append(_goal("1.5b full fine-tune: ≥ 50% MFU", measured, None if mfu is None else mfu >= 0.5))
    peak = (ok("7b", "qlora", "mftune", "default") or {}).get("peak_gib")
    measured = "-" if peak is None else f"{peak:.1f} GiB"
    found.append(
        _goal("7b QLoRA at 4,096 tokens: peak ≤ 10 GiB", measured, None if peak is None else peak <= 10)
    )
    return found


def _goal(goal: str, measured: str, met: bool | None) -> dict:
    return {"goal": goal, "measured": measured, "met": met}


def _all_met(verdicts: list[bool | None]) -> bool | None:
    """False if any verdict is False, else None if any is unknown, else True."""
    if False in verdicts:
        return False
    return None if None in verdicts else True


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def not_measured(report: dict) -> list[str]:
    """Every part, backend row and throughput case that did not run to an outcome, and why."""
    lines = [
        f"{part}: stopped at its deadline"
        for part in ("environment", "tests", "backends")
        if "status" in report.get(part, {}) and report[part]["status"] is None
    ]
    for row in report.get("backends", {}).get("results", []):
        if row["status"] == "skipped":
            lines.append(f"backend {row['backend']} {row['method']}: {row['reason']}")
    for grid, result in report.get("throughput", {}).items():
        if result.get("status", 0) is None:
            lines.append(f"throughput {grid}: stopped at its deadline")
        for r in result.get("results", []):
            if r["status"] in ("skipped", "out_of_time"):
                lines.append(f"throughput {grid} {r['method']} {r['side']} {r['setting']}: {r['error']}")
    return lines


def failures(report: dict) -> list[str]:
    """What failed: a test, a backend row, a throughput case (not what was skipped for time or a package)."""
    found = [
        f"test {c['test']}"
        for c in report.get("tests", {}).get("cases", [])
        if c["outcome"] in ("failed", "error")
    ]
    found += [
        f"backend {r['backend']} {r['method']}"
        for r in report.get("backends", {}).get("results", [])
        if r["status"] == "FAIL"
    ]
    for grid, result in report.get("throughput", {}).items():
        found += [
            f"throughput {grid} {r['method']} {r['side']} {r['setting']}: {r['status']}"
            for r in result.get("results", [])
            if r["status"] not in NOT_FAILURES
        ]
    return found


def markdown(report: dict) -> str:
    """The session as markdown: environment, tests, backends, throughput, goals, and what did not run."""
    env = report.get("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    lines = [
        f"# mftune GPU session: {env.get('device', '?')}, {env.get('date', '?')}",
        "",
        f"`{report['command']}`: {report['elapsed_s']:.0f} of {report['budget_s']:.0f} s; commit {env.get('commit')}",
        f"python {env.get('python')}, CUDA {env.get('cuda')}; {versions}",
    ]
    if report.get("smoke"):
        lines.append("--smoke: tiny shapes on a CPU, a check of the script; its numbers mean nothing")
    if env.get("matmul_tflops"):
        lines.append(
            f"bf16 matmul (8192³): {env['matmul_tflops']:.0f} TFLOP/s measured; MFU is of {DATASHEET_TFLOPS:g}"
        )
    if env.get("nvidia_smi"):
        lines += ["", "```", env["nvidia_smi"], "```"]
    cases = report.get("tests", {}).get("cases", [])
    outcomes = sorted({c["outcome"] for c in cases})
    lines += [
        "",
        "## pytest -m gpu",
        "",
        ", ".join(f"{sum(c['outcome'] == o for c in cases)} {o}" for o in outcomes) or "no report",
    ]
    lines += [
        f"- {c['outcome']}: `{c['test']}`: {c['message']}"
        for c in cases
        if c["outcome"] in ("failed", "error")
    ]
    if rows := report.get("backends", {}).get("results"):
        tol = Tolerances(**report["backends"]["tolerances"])
        lines += [
            "",
            "## Backends: benchmarks/backends.py check, one process each",
            "",
            check_table(rows, tol),
        ]
    if rows := [r for grid in report.get("throughput", {}).values() for r in grid.get("results", [])]:
        lines += ["", "## Throughput: benchmarks/throughput.py", "", table(rows), "", MFU_FORMULA]
    lines += ["", "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for g in report.get("goals", []):
        lines.append(
            f"| {g['goal']} | {g['measured']} | {'not measured' if g['met'] is None else 'yes' if g['met'] else 'NO'} |"
        )
    if report.get("not_measured"):
        lines += ["", "## Not measured", "", *(f"- {line}" for line in report["not_measured"])]
    return "\n".join(lines) + "\n"


def write_logs(workdir: Path, path: Path) -> None:
    """The last `LOG_LINES` lines of every log the session's parts wrote, in one tar.gz."""
    with tarfile.open(path, "w:gz") as tar:
        for log in sorted(workdir.rglob("logs/*.log")):
            data = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_LINES:]).encode()
            info = tarfile.TarInfo(str(log.relative_to(workdir)))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
