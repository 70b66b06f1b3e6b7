"""The multi-task quality study (benchmarks/multitask_quality.py): its data, its pre-trained base, its
statistics, and the smoke size end to end, with the report's arithmetic recomputed from results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from multitask_data import CODE_TASK, TASKS, code_task, heldout_keys, write_corpus
from multitask_stats import point_estimates, summarise

from mftune.eval.problems import read_problems


def test_write_code_problems_pass_their_tests_and_a_wrong_solution_does_not() -> None:
    import random

    from multitask_data import code_problem

    rng = random.Random(5)
    for _ in range(40):
        problem = code_problem(rng)
        program = problem.solution + "\n" + "\n".join(problem.tests)
        exec(program, {})  # the generator's own code and tests: they must pass
        name = problem.solution.split("(")[0].removeprefix("def ")
        wrong = problem.solution + f"\n_real = {name}\n{name} = lambda *a: (_real(*a), 'wrong')\n"
        with pytest.raises(AssertionError):
            exec(wrong + "\n".join(problem.tests), {})


def _problem_identity(instruction: str) -> tuple[str, str]:
    signature = instruction.split("`")[1]
    what = instruction.split("returns ", 1)[1]
    return signature, what


def test_write_code_held_out_problems_never_appear_in_training(tmp_path: Path) -> None:
    train, heldout = code_task(200, 60, seed=3)
    trained = {_problem_identity(r["messages"][0]["content"]) for r in train}
    assert len(trained) == 200
    assert not {_problem_identity(r["messages"][0]["content"]) for r in heldout} & trained
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in heldout))
    problems = read_problems(CODE_TASK, path)
    assert {p.kind for p in problems} == {"chat_tests"} and all(
        p.tests.count("assert") == 3 for p in problems
    )


def test_the_corpus_holds_no_held_out_problem(tmp_path: Path) -> None:
    keys = heldout_keys(20)
    write_corpus(tmp_path / "corpus.jsonl", 300, seed=0, num_heldout=20)
    text = (tmp_path / "corpus.jsonl").read_text()
    documents = [doc for line in text.splitlines() for doc in json.loads(line)["text"].split("\n\n")]
    assert len(documents) == 300 * 8
    expressions = {doc.split("\n")[0].removeprefix(">>> ") for doc in documents if doc.startswith(">>> ")}
    assert expressions and not expressions & keys
    codes = {doc.split("\n", 1)[1] for doc in documents if doc.startswith("# ")}
    assert codes and not codes & keys


def test_pretraining_is_deterministic_and_cached(tmp_path: Path) -> None:
    from multitask_pretrain import PretrainSpec, pretrained_base
    from safetensors.torch import load_file

    spec = PretrainSpec(32, 2, 2, 64, corpus_records=32, steps=3, batch=2, learning_rate=3e-3, heldout=2)
    first, built = pretrained_base(tmp_path / "a", spec, threads=1)
    second, _ = pretrained_base(tmp_path / "b", spec, threads=1)
    assert built
    weights = [load_file(next(d.glob("*.safetensors"))) for d in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    random_init = load_file(next((first.parents[1] / "random").glob("*.safetensors")))
    assert any((weights[0][k] != random_init[k]).any() for k in random_init)  # it did train
    stamp = next(first.glob("*.safetensors")).stat().st_mtime_ns
    again, built_again = pretrained_base(tmp_path / "a", spec, threads=1)
    assert (again, built_again) == (first, False)
    assert next(first.glob("*.safetensors")).stat().st_mtime_ns == stamp


def _synthetic(setups: dict[str, float], seeds: int = 3, n: int = 40) -> dict:
    rng = np.random.default_rng(7)
    return {
        s: {k: {t: list((rng.random(n) < p).astype(float)) for t in TASKS} for k in range(seeds)}
        for s, p in setups.items()
    }


def test_point_estimates_are_means_over_seeds_of_per_seed_scores() -> None:
    outcomes = _synthetic({"token": 0.3, "task": 0.5})
    points = point_estimates(outcomes, TASKS)
    for setup, by_seed in outcomes.items():
        per_seed = [[sum(by_seed[k][t]) / len(by_seed[k][t]) for t in TASKS] for k in by_seed]
        assert points[setup]["mean"] == pytest.approx(sum(sum(r) / len(r) for r in per_seed) / len(per_seed))
        worst = min(TASKS, key=lambda t: points[setup][t])
        assert (points[setup]["worst_task"], points[setup]["worst"]) == (worst, points[setup][worst])
        for i, t in enumerate(TASKS):
            assert points[setup][t] == pytest.approx(sum(r[i] for r in per_seed) / len(per_seed))


def test_intervals_cover_the_estimate_and_paired_differences_of_equal_setups_are_zero() -> None:
    outcomes = _synthetic({"token": 0.3, "task": 0.6})
    outcomes["copy"] = outcomes["token"]
    summary = summarise(outcomes, TASKS, ("token",), draws=300)
    for setup, row in summary["setups"].items():
        for key, entry in row.items():
            if key != "worst_task":
                assert 0 <= entry["low"] <= entry["value"] <= entry["high"] <= 1, (setup, key, entry)
        assert row["worst"] == row[row["worst_task"]]
    same = summary["differences"]["token"]["copy"]
    assert all(e["value"] == e["low"] == e["high"] == 0 for e in same.values())
    better = summary["differences"]["token"]["task"]["mean"]
    assert better["low"] > 0 and better["wins"] == "3/3"  # 0.6 against 0.3 on 200 problems per seed
    constant = {"a": {0: {t: [1.0] * 5 for t in TASKS}}}
    assert summarise(constant, TASKS, (), draws=50)["setups"]["a"]["mean"] == {
        "value": 1.0,
        "low": 1.0,
        "high": 1.0,
    }


@pytest.mark.slow
def test_smoke_study_writes_a_report_whose_arithmetic_holds(tmp_path: Path) -> None:
    from multitask_quality import BASELINES, main

    assert main(["--size", "smoke", "--workdir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    outcomes, summary = results["outcomes"], results["summary"]
    expected = {"zero-shot", "token", "mftcoder-task", "sample", "task", "task_sample", "coba", "coba-defaults",
                "single-epochs", "single-steps"}  # fmt: skip
    assert set(outcomes) == expected == set(summary["setups"])
    for by_seed in outcomes.values():
        assert set(by_seed) == {"0", "1"} and all(set(tasks) == set(TASKS) for tasks in by_seed.values())
    # Means recomputed from the per-problem outcomes; intervals recomputed from the same draws.
    assert summary == json.loads(json.dumps(summarise(outcomes, TASKS, BASELINES, draws=summary["draws"])))
    for setup, by_seed in outcomes.items():
        mean = np.mean([np.mean([np.mean(v[t]) for t in TASKS]) for v in by_seed.values()])
        assert summary["setups"][setup]["mean"]["value"] == pytest.approx(mean)
    for base, rows in summary["differences"].items():
        for setup, row in rows.items():
            diff = summary["setups"][setup]["mean"]["value"] - summary["setups"][base]["mean"]["value"]
            assert row["mean"]["value"] == pytest.approx(diff)
    # Every single-task row spends the multi-task run's steps in all.
    for seed in results["by_seed"].values():
        steps = {r["name"]: r["steps"] for r in seed["runs"]}
        for setup in ("single-epochs", "single-steps"):
            total = sum(v for k, v in steps.items() if k.startswith(setup))
            assert abs(total - steps["task"]) <= len(TASKS)
        assert {r["scope"] for r in seed["runs"] if r["setup"] == "mftcoder-task"} == {"micro_batch"}
    report = (tmp_path / "results.md").read_text()
    for heading in ("### Scores", "### Paired differences against token", "### CoBa's time", "### The goal"):
        assert heading in report
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"task.png", "coba.png", "token.png"}
    assert len(results["ab"]) == len(results["spec"]["ab_order"])

    # An interrupted study resumes: recorded runs are reused untouched, an unrecorded one (its folder
    # left half-written) is trained again from nothing.
    seed_file = tmp_path / "seed-1" / "results.json"
    saved = json.loads(seed_file.read_text())
    dropped = saved["runs"].pop()["name"]
    seed_file.write_text(json.dumps(saved))
    kept = tmp_path / "seed-1" / "runs" / saved["runs"][0]["name"] / "metrics.jsonl"
    stamp = kept.stat().st_mtime_ns
    assert main(["--size", "smoke", "--workdir", str(tmp_path), "--no-ab"]) == 0
    again = json.loads(seed_file.read_text())
    names = sorted(r["name"] for r in again["runs"])
    assert names == sorted(r["name"] for r in results["by_seed"]["1"]["runs"]) and dropped in names
    assert kept.stat().st_mtime_ns == stamp
