"""Score eval tasks: plan them from the config, generate, compare with answers or run the tests.

`plan_tasks` reads every task's records and settles its metrics before any model is loaded, so bad
records fail fast and all at once. `score_tasks` then generates with an engine and scores: exact match
of the greedy reply, and pass@k of n samples run in the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mftune.config.errors import ConfigError
from mftune.config.eval_schema import EvalConfig, EvalTaskConfig
from mftune.data.reader import DataError
from mftune.eval.benchmarks import benchmark_file
from mftune.eval.engine import Sampling
from mftune.eval.metrics import mean_and_stderr, normalise, pass_at_k
from mftune.eval.problems import CODE_KINDS, Problem, ProblemError, read_problems
from mftune.eval.prompts import Prompt, build_program, build_prompt, cut_at_stops, resolve_style
from mftune.eval.sandbox import Sandbox


@dataclass(frozen=True)
class EvalTask:
    """One task, read and with its metrics settled."""

    name: str
    cfg: EvalTaskConfig
    problems: list[Problem]
    metrics: tuple[str, ...]


@dataclass
class TaskScores:
    """A task's metrics (`exact_match`, `pass@k` ...: value, stderr, count) and its per-sample rows."""

    metrics: dict[str, dict] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


def plan_tasks(cfg: EvalConfig) -> list[EvalTask]:
    """Every eval task with its problems and metrics.

    Raises:
        ProblemError: Records that cannot be read, or lack what a metric asked for needs (every one).
        FileNotFoundError: A path with no records.
        MissingPackageError: A benchmark whose package is not installed.
    """
    tasks, errors = [], []
    for name, task_cfg in cfg.tasks.items():
        path = task_cfg.path or benchmark_file(task_cfg.benchmark or "")
        try:
            problems = read_problems(name, path, limit=task_cfg.limit)
        except ProblemError as err:
            errors += err.errors
            continue
        metrics = task_cfg.metrics or _inferred_metrics(problems)
        errors += _unscorable(problems, metrics)
        tasks.append(EvalTask(name, task_cfg, problems, tuple(dict.fromkeys(metrics))))
    if errors:
        raise ProblemError(errors)
    return tasks


def _inferred_metrics(problems: list[Problem]) -> list[str]:
    first = problems[0]
    return ["pass_at_k"] if first.kind in CODE_KINDS else ["exact_match"]


def _unscorable(problems: list[Problem], metrics: list[str]) -> list[DataError]:
    errors = []
    for p in problems:
        file, _, line = p.source.rpartition(":")
        if "exact_match" in metrics and p.answer is None:
            errors.append(
                DataError(file, int(line), "answer", "missing: exact_match needs the expected answer")
            )
        if "pass_at_k" in metrics and p.kind not in CODE_KINDS:
            errors.append(
                DataError(
                    file, int(line), "tests", "missing: pass_at_k needs tests (tests, test_list, or test)"
                )
            )
    return errors


@dataclass(frozen=True)
class Encoded:
    """A problem's prompt and its token ids."""

    problem: Problem
    prompt: Prompt
    ids: list[int]


def encode_prompts(task: EvalTask, tokenizer, context: int | None) -> list[Encoded]:
    """Each problem's prompt, rendered in the task's style and tokenized as training tokenized it.

    Raises:
        ProblemError: Prompts that do not fit the model's context (every one).
    """
    from mftune.infer.generate import prompt_ids

    has_template = bool(getattr(tokenizer, "chat_template", None))
    style = resolve_style(task.cfg.prompt, has_template)
    if style == "chat" and not has_template:
        raise ConfigError(
            f"eval.tasks.{task.name}.prompt.style is chat, but the tokenizer has no chat template: "
            "set it to completion (or auto)"
        )
    encoded, errors = [], []
    for problem in task.problems:
        prompt = build_prompt(problem, task.cfg.prompt, style)
        if prompt.style == "chat":
            ids = prompt_ids(tokenizer, list(prompt.messages or ()))
        else:
            ids = tokenizer(prompt.text)["input_ids"]
        if context is not None and len(ids) >= context:
            file, _, line = problem.source.rpartition(":")
            field_name = "messages" if problem.messages else "prompt"
            reason = f"the prompt is {len(ids)} tokens, and the model's context is {context}"
            errors.append(DataError(file, int(line), field_name, reason))
        encoded.append(Encoded(problem, prompt, ids))
    if errors:
        raise ProblemError(errors)
    return encoded


def score_tasks(
    tasks: list[EvalTask],
    generate: Callable[[list[list[int]], Sampling], list[list[str]]],
    tokenizer,
    cfg: EvalConfig,
    sandbox: Sandbox | None,
    decode: Callable[[list[int]], str],
    context: int | None = None,
) -> dict[str, TaskScores]:
    """Generate for and score every task.

    Args:
        tasks: From `plan_tasks`.
        generate: An engine's `generate`.
        tokenizer: The model's tokenizer, carrying its chat template.
        cfg: The eval section.
        sandbox: Where programs run (needed when a task has pass_at_k).
        decode: Token ids to the text a sample row shows as its prompt.
        context: The model's context length, when known: prompts must fit it.
    """
    results = {}
    for task in tasks:
        encoded = encode_prompts(task, tokenizer, context)
        longest = max(len(e.ids) for e in encoded)
        max_new = task.cfg.max_new_tokens or cfg.max_new_tokens
        if context is not None:
            max_new = max(1, min(max_new, context - longest))
        results[task.name] = _score(task, encoded, generate, cfg, sandbox, decode, max_new)
    return results


def _score(task, encoded, generate, cfg: EvalConfig, sandbox, decode, max_new: int) -> TaskScores:
    scores = TaskScores()
    ids = [e.ids for e in encoded]
    stops = encoded[0].prompt.stop
    greedy = Sampling(1, 0.0, 1.0, max_new, stops, cfg.seed)
    sampled = task.cfg.pass_at_k
    sampling = Sampling(sampled.n, sampled.temperature, sampled.top_p, max_new, stops, cfg.seed)
    rows = [
        {"task": task.name, "id": e.problem.id, "source": e.problem.source, "prompt": decode(e.ids)}
        for e in encoded
    ]
    if "exact_match" in task.metrics:
        replies = [cut_at_stops(samples[0], stops) for samples in generate(ids, greedy)]
        rule = task.cfg.exact_match
        hits = []
        for row, e, reply in zip(rows, encoded, replies, strict=True):
            expected = normalise(e.problem.answer or "", **rule.model_dump())
            hit = normalise(reply, **rule.model_dump()) == expected
            hits.append(float(hit))
            scores.samples.append(
                {**row, "metric": "exact_match", "sample": 0, "generation": reply,
                 "reference": e.problem.answer, "outcome": "match" if hit else "mismatch", "message": ""}
            )  # fmt: skip
        value, stderr = mean_and_stderr(hits)
        scores.metrics["exact_match"] = {"value": value, "stderr": stderr, "count": len(hits)}
    if "pass_at_k" in task.metrics:
        if sandbox is None:
            raise ValueError("pass_at_k needs a sandbox")
        texts = generate(ids, sampling)
        programs, owners = [], []
        for index, (e, samples) in enumerate(zip(encoded, texts, strict=True)):
            for j, text in enumerate(samples):
                text = cut_at_stops(text, stops)
                programs.append(build_program(e.problem, text, e.prompt.style, task.cfg.prompt.extract))
                owners.append((index, j, text))
        outcomes = sandbox.run_many(programs)
        passed = [0] * len(encoded)
        for (index, j, text), outcome in zip(owners, outcomes, strict=True):
            passed[index] += outcome.status == "passed"
            scores.samples.append(
                {**rows[index], "metric": "pass_at_k", "sample": j, "generation": text,
                 "reference": encoded[index].problem.reference, "outcome": outcome.status,
                 "message": outcome.message, "seconds": round(outcome.seconds, 3)}
            )  # fmt: skip
        for k in sampled.k:
            value, stderr = mean_and_stderr([pass_at_k(sampled.n, c, k) for c in passed])
            scores.metrics[f"pass@{k}"] = {
                "value": value,
                "stderr": stderr,
                "count": len(passed),
                "n": sampled.n,
            }
    return scores


def score_samples(
    problems: list[Problem], samples: list[tuple[str, str, str]], ks: list[int], sandbox: Sandbox
) -> TaskScores:
    """pass@k of completions made elsewhere: (task_id, completion, file:line) per sample, several per
    problem allowed, each run against its problem as a completion (HumanEval's sample format).

    Raises:
        ProblemError: A sample names no known problem, or a k exceeds a problem's sample count.
    """
    by_id = {p.id: p for p in problems}
    errors, grouped = [], {}
    for task_id, completion, source in samples:
        file, _, line = source.rpartition(":")
        if task_id not in by_id:
            errors.append(DataError(file, int(line), "task_id", f"{task_id!r} is not a problem of the set"))
            continue
        grouped.setdefault(task_id, []).append((completion, source))
    for task_id, group in grouped.items():
        if max(ks) > len(group):
            file, _, line = group[0][1].rpartition(":")
            reason = f"k = {max(ks)} is larger than the {len(group)} sample(s) of {task_id}"
            errors.append(DataError(file, int(line), "task_id", reason))
    if errors:
        raise ProblemError(errors)
    jobs = [(by_id[t], c, s) for t, group in grouped.items() for c, s in group]
    outcomes = sandbox.run_many([build_program(p, c, "completion", "none") for p, c, _ in jobs])
    scores, passed = TaskScores(), {t: 0 for t in grouped}
    for (problem, completion, source), outcome in zip(jobs, outcomes, strict=True):
        passed[problem.id] += outcome.status == "passed"
        scores.samples.append(
            {"task": problem.task, "id": problem.id, "source": source, "metric": "pass_at_k",
             "generation": completion, "outcome": outcome.status, "message": outcome.message}
        )  # fmt: skip
    for k in ks:
        values = [pass_at_k(len(grouped[t]), passed[t], k) for t in grouped]
        value, stderr = mean_and_stderr(values)
        scores.metrics[f"pass@{k}"] = {"value": value, "stderr": stderr, "count": len(values)}
    return scores
