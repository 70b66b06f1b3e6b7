"""`mftune eval` end to end, and the evaluation `mftune train` runs during and after training."""

from __future__ import annotations

from pathlib import Path

import torch

from mftune.config.eval_schema import EvalConfig
from mftune.eval.engine import TransformersEngine, VllmEngine
from mftune.eval.report import flat_metrics, print_table, write_results
from mftune.eval.sandbox import Sandbox
from mftune.eval.scoring import EvalTask, TaskScores, encode_prompts, plan_tasks, score_tasks
from mftune.eval.target import Target, context_length, load_target, load_target_tokenizer


def run_eval(
    target: Target,
    cfg: EvalConfig,
    run_cfg,
    out_dir: Path,
    *,
    show: int = 0,
    device: torch.device | None = None,
) -> dict:
    """Evaluate `target` on `cfg`'s tasks (and its run's validation losses), write and print the results.

    Args:
        target: From `resolve_target`.
        cfg: The eval section.
        run_cfg: The run's (or the given) `Config`, or None for a bare model folder.
        out_dir: Where results.json, samples.jsonl and scores.png go.
        show: Sample rows printed per task.
        device: Default: CUDA when available, else the CPU.

    Returns:
        The results, as written to results.json.
    """
    tasks = plan_tasks(cfg)  # every record is checked before the model loads
    sandbox = Sandbox(cfg.sandbox) if _needs_sandbox(tasks) else None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wants_loss = cfg.loss and run_cfg is not None
    if cfg.engine == "vllm":
        losses = {}
        if wants_loss:  # through transformers, freed before vLLM takes the GPU
            model, tokenizer = load_target(target, run_cfg, device)
            losses = validation_losses(model, tokenizer, run_cfg, device)
            del model
            torch.cuda.empty_cache()
        tokenizer = load_target_tokenizer(target, run_cfg)
        engine, context = _vllm_engine(target, tokenizer), None
    else:
        model, tokenizer = load_target(target, run_cfg, device)
        losses = validation_losses(model, tokenizer, run_cfg, device) if wants_loss else {}
        engine = TransformersEngine(model, tokenizer, cfg.batch_size)
        context = context_length(model)
    try:
        scores = score_tasks(tasks, engine.generate, tokenizer, cfg, sandbox, _decoder(tokenizer), context)
    finally:
        if isinstance(engine, VllmEngine):
            engine.close()
    header = {
        "target": str(target.path),
        "engine": engine.name,
        "seed": cfg.seed,
        "sandbox": sandbox.isolation.as_dict() if sandbox else None,
    }
    results = write_results(out_dir, scores, losses, header)
    print_table(results["tasks"])
    _show(scores, show)
    print(f"results: {out_dir / 'results.json'}  samples: {out_dir / 'samples.jsonl'}")
    return results


def dry_run(target: Target, cfg: EvalConfig, run_cfg, count: int) -> None:
    """Print each task's first `count` prompts exactly as the model would get them; generate nothing."""
    tasks = plan_tasks(cfg)
    tokenizer = load_target_tokenizer(target, run_cfg)
    decode = _decoder(tokenizer)
    for task in tasks:
        encoded = encode_prompts(task, tokenizer, None)
        style = encoded[0].prompt.style
        print(
            f"== {task.name}: {len(task.problems)} problems, {style} style, metrics {', '.join(task.metrics)}"
        )
        for e in encoded[:count]:
            print(f"-- {e.problem.source} ({len(e.ids)} tokens)")
            print(decode(e.ids))
            if e.prompt.stop:
                print(f"-- stops at: {list(e.prompt.stop)}")
        print()


def validation_losses(model, tokenizer, run_cfg, device: torch.device) -> dict[str, dict]:
    """Loss, token accuracy and perplexity per training task on its validation split, through the
    evaluation the training loop runs (`mftune.train.evaluate`)."""
    from accelerate import Accelerator

    from mftune.data.pipeline import padding_id, prepare_data
    from mftune.train.evaluate import evaluate

    data = prepare_data(run_cfg, tokenizer)
    pad_id = padding_id(tokenizer)
    accelerator = Accelerator(cpu=device.type == "cpu")
    metrics = evaluate(accelerator, model, data, pad_id, run_cfg.train.micro_batch_size, 2048)
    return losses_from_metrics(metrics, {t.name: len(t.valid) for t in data.tasks})


def losses_from_metrics(metrics: dict[str, float], samples: dict[str, int]) -> dict[str, dict]:
    """`valid/<task>/{loss,accuracy,ppl}` metrics as results.json's per-task `loss` entries."""
    return {
        name: {
            "loss": metrics[f"valid/{name}/loss"],
            "accuracy": metrics[f"valid/{name}/accuracy"],
            "ppl": metrics[f"valid/{name}/ppl"],
            "samples": count,
        }
        for name, count in samples.items()
        if f"valid/{name}/loss" in metrics
    }


class TrainingEval:
    """The eval section run on the model being trained: every `train.eval_generate_every` steps and at
    the end, on the main process. Tasks are read (and checked) once, when training starts."""

    def __init__(self, cfg, tokenizer, chat_template: str):
        self.cfg = cfg.eval
        self.tasks = plan_tasks(self.cfg)
        self.sandbox = Sandbox(self.cfg.sandbox) if _needs_sandbox(self.tasks) else None
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.out_dir = Path(self.cfg.output_dir or Path(cfg.train.output_dir) / "eval")

    def scores(self, model) -> dict[str, TaskScores]:
        was_training = model.training
        model.eval()
        self.tokenizer.chat_template = self.chat_template
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = True  # training turns the cache off; generation wants it
        try:
            engine = TransformersEngine(model, self.tokenizer, self.cfg.batch_size)
            return score_tasks(
                self.tasks,
                engine.generate,
                self.tokenizer,
                self.cfg,
                self.sandbox,
                _decoder(self.tokenizer),
                context_length(model),
            )
        finally:
            model.config.use_cache = use_cache
            if was_training:
                model.train()

    def metrics(self, model) -> dict[str, float]:
        """`eval/<task>/<metric>` of the model now."""
        return flat_metrics({name: s.metrics for name, s in self.scores(model).items()})

    def final(self, model, valid_metrics: dict[str, float], samples: dict[str, int]) -> dict[str, float]:
        """Score the final model, write results.json (with the last validation losses) and print the table."""
        scores = self.scores(model)
        header = {
            "target": "training",
            "engine": "transformers",
            "seed": self.cfg.seed,
            "sandbox": self.sandbox.isolation.as_dict() if self.sandbox else None,
        }
        results = write_results(self.out_dir, scores, losses_from_metrics(valid_metrics, samples), header)
        print_table(results["tasks"])
        return flat_metrics({name: s.metrics for name, s in scores.items()})


def _needs_sandbox(tasks: list[EvalTask]) -> bool:
    return any("pass_at_k" in t.metrics for t in tasks)


def _vllm_engine(target: Target, tokenizer) -> VllmEngine:
    from transformers import GenerationConfig

    from mftune.eval.target import TargetError
    from mftune.infer.load import reply_stop_ids

    if target.model_dir is None:
        raise TargetError("eval.engine vllm evaluates a run's final/ or a model folder, not a checkpoint")
    try:
        eos = GenerationConfig.from_pretrained(target.model_dir).eos_token_id
    except OSError:
        eos = None
    return VllmEngine(target.model_dir, reply_stop_ids(eos, tokenizer))


def _decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def _show(scores: dict[str, TaskScores], count: int) -> None:
    for name, task in scores.items():
        for row in task.samples[:count]:
            prompt = row["prompt"][-300:]
            print(f"\n[{name}] {row['source']}: {row['outcome']} {row.get('message') or ''}")
            print(f"  prompt (end): {prompt!r}")
            print(f"  expected:     {row.get('reference')!r}")
            print(f"  model:        {row['generation']!r}")
