"""The training loop (DESIGN.md §6), readable top to bottom.

Set up data, model and optimizer; resume if a checkpoint exists; then for each optimizer step: train,
log, evaluate, save. SIGTERM ends the run after the current step with a checkpoint. Evaluation and
checkpoint saves are left out of the training time that the logged rates divide by.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mftune.config import Config, config_to_dict, dump_config
from mftune.data.pipeline import MultiTaskData, load_tokenizer, padding_id, prepare_data
from mftune.train import checkpoint as ckpt
from mftune.train import run_folder
from mftune.train.batches import BatchPlan, DataPosition, collate_micro_batches, iterate_steps, steps_in_epoch
from mftune.train.distributed import configure_deepspeed, quiet_other_ranks, shards_state
from mftune.train.evaluate import evaluate
from mftune.train.optim import build_optimizer, build_scheduler
from mftune.train.step import LossSpec, StepResult, train_step
from mftune.train.task_weights import TaskBalancer
from mftune.train.tracking import (
    MetricsWriter,
    TrainClock,
    environment_snapshot,
    peak_memory_gib,
    plot_task_curves,
    write_json,
)


def train(cfg: Config) -> Path:
    """Train a model as `cfg` says and return the folder of the final model or adapter.

    Raises:
        ConfigError: before anything is written, when the run cannot start: its output folder is held
            by a live run, holds another config's run, or cannot be written.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    quiet_other_ranks(accelerator)
    if not accelerator.is_main_process:  # the main process holds the run folder for every rank
        return _train(cfg, accelerator)
    with run_folder.hold(cfg.train.output_dir):
        run_folder.check_same_run(cfg.train.output_dir, config_to_dict(cfg))
        return _train(cfg, accelerator)


def _train(cfg: Config, accelerator) -> Path:
    from accelerate.utils import set_seed

    from mftune.model.load import load_model

    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():  # rank 0 builds the token cache, the others then read it
        data = prepare_data(cfg, tokenizer, rank=accelerator.process_index)
    plan = BatchPlan(
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
    )
    total_steps = planned_steps(cfg, data, plan)

    model = load_model(
        cfg.model,
        cfg.finetune,
        device=accelerator.device,
        packing=cfg.data.packing,
        max_seq_len=cfg.data.max_seq_len,
    )
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    configure_deepspeed(
        accelerator, micro_batch_size=cfg.train.micro_batch_size, max_grad_norm=cfg.train.max_grad_norm
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    state = _resume(cfg, accelerator, model, optimizer, scheduler)

    if accelerator.is_main_process:
        _write_run_files(cfg, out, accelerator, data, plan, total_steps)
    log = RunLog(cfg, out, accelerator, data, total_steps, start_step=state.step, resumed=state.step > 0)
    pad_id = padding_id(tokenizer)
    balancer = TaskBalancer(cfg, data, pad_id)
    balancer.load_state_dict(state.extra)
    spec = LossSpec(cfg.train.loss, balancer.weights, scope=cfg.train.loss_scope)
    stop = StopSignal()
    steps = iterate_steps(data, plan, DataPosition(state.epoch, state.step_in_epoch))
    validate = functools.partial(
        evaluate, accelerator, model, data, pad_id, cfg.train.micro_batch_size, spec.chunk_size
    )

    generation_eval = _generation_eval(cfg, accelerator, tokenizer, data)
    last_valid: dict[str, float] = {}
    if state.step == 0:  # the baseline every later evaluation is read against
        with log.untimed():
            last_valid = validate()
            log.write(0, last_valid)
            log.write(0, balancer.after_step(0, model, accelerator.device))
        state.extra = balancer.state_dict()
    model.train()
    stopping, saved_at = False, state.step  # a resumed run starts from a saved step
    while state.step < total_steps and not stopping:
        position, rows = next(steps)
        batches = collate_micro_batches(data, rows, pad_id)
        result = train_step(accelerator, model, optimizer, scheduler, batches, spec, cfg.train.max_grad_norm)
        _advance(state, position, result)
        log.step(state.step, result, scheduler.get_last_lr()[0])
        if coba_values := balancer.after_step(state.step, model, accelerator.device):
            spec.task_weights = balancer.weights
            state.extra = balancer.state_dict()  # the balancer only changes when it observes
            log.write(state.step, coba_values)
        if state.step % cfg.train.eval_every == 0 or state.step == total_steps:
            with log.untimed():
                metrics = last_valid = validate()
            log.write(state.step, metrics)
            if _early_stop(cfg, state, metrics):
                break
        every = cfg.train.eval_generate_every
        if every and state.step % every == 0 and state.step < total_steps:
            with log.untimed():
                log.write(state.step, _run_generation_eval(generation_eval, accelerator, model))
        stopping = stop.agreed(accelerator)
        if state.step % cfg.train.save_every == 0 or stopping:
            with log.untimed():
                _save(cfg, accelerator, model, optimizer, scheduler, state)
            saved_at = state.step

    if saved_at != state.step:  # decided in memory, the same on every rank (machines may not share files)
        _save(cfg, accelerator, model, optimizer, scheduler, state)
    final = _export(accelerator, model, tokenizer, data, out / "final")
    if generation_eval is not None or cfg.eval.tasks:
        samples = {t.name: len(t.valid) for t in data.tasks}
        log.write(state.step, _run_generation_eval(generation_eval, accelerator, model, last_valid, samples))
    log.close(plots=cfg.train.plots)
    return final


def _generation_eval(cfg: Config, accelerator, tokenizer, data: MultiTaskData):
    """The eval section's scorer on the main process, or None: no eval tasks, another rank, or weights
    that no single rank holds (ZeRO, FSDP), where the final model is evaluated with `mftune eval`."""
    if not cfg.eval.tasks or not accelerator.is_main_process:
        return None
    if shards_state(accelerator):
        warnings.warn(
            "eval.tasks are not scored during training under DeepSpeed ZeRO or FSDP (no rank holds the "
            f"whole model): run `mftune eval {cfg.train.output_dir}` when it ends",
            stacklevel=2,
        )
        return None
    from mftune.eval.run import TrainingEval

    return TrainingEval(cfg, tokenizer, data.template.chat_template())  # reads and checks the records now


def _run_generation_eval(generation_eval, accelerator, model, valid=None, samples=None) -> dict[str, float]:
    """The eval section's metrics (the end of training: also results.json); {} on other ranks."""
    metrics = {}
    if generation_eval is not None:
        unwrapped = accelerator.unwrap_model(model)
        if valid is None:
            metrics = generation_eval.metrics(unwrapped)
        else:
            metrics = generation_eval.final(unwrapped, valid, samples or {})
    accelerator.wait_for_everyone()
    return metrics


def planned_steps(cfg: Config, data: MultiTaskData, plan: BatchPlan) -> int:
    """Optimizer steps of the run: `max_steps`, else `epochs` × the steps of an epoch."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_in_epoch(len(data.epoch_rows(0)), plan)))


def _advance(state: ckpt.TrainerState, position: DataPosition, result: StepResult) -> None:
    state.step += 1
    state.epoch, state.step_in_epoch = position.epoch, position.step_in_epoch + 1
    state.tokens_seen += result.num_tokens


def _resume(cfg: Config, accelerator, model, optimizer, scheduler) -> ckpt.TrainerState:
    """The trainer state to start from: a fresh one, or the one `train.resume` points at, restored.

    Raises:
        ValueError: the checkpoint was written with sharded state (ZeRO, FSDP) and this run has none,
            or the other way round.
    """
    resume = cfg.train.resume
    if resume == "never":
        return ckpt.TrainerState()
    path = ckpt.latest_intact_checkpoint(cfg.train.output_dir) if resume == "auto" else Path(resume)
    if path is None:
        return ckpt.TrainerState()
    if resume != "auto" and ckpt.is_adapter_folder(path):  # a PEFT adapter, such as MFTCoder's step_N
        ckpt.warm_start_adapter(accelerator.unwrap_model(model), path)
        if accelerator.is_main_process:
            print(f"warm start from the adapter in {path}: optimizer, schedule and data order start fresh")
        return ckpt.TrainerState()
    ckpt.check_resumable(path)
    sharded = shards_state(accelerator)
    if ckpt.is_sharded_checkpoint(path) != sharded:
        written, now = ("with", "without") if not sharded else ("without", "with")
        raise ValueError(
            f"{path} was written {written} sharded state (DeepSpeed ZeRO or FSDP) and this run is {now}: "
            "resume it with the accelerate config that wrote it"
        )
    if sharded:
        state = ckpt.load_sharded_checkpoint(accelerator, path, scheduler)
    else:
        state = ckpt.load_checkpoint(path, accelerator.unwrap_model(model), optimizer, scheduler)
    if accelerator.is_main_process:
        print(f"resumed from {path} (step {state.step})")
    return state


def _early_stop(cfg: Config, state: ckpt.TrainerState, metrics: dict[str, float]) -> bool:
    rule = cfg.train.early_stopping
    value = metrics.get(rule.metric)
    if value is None:
        return False
    state.last_metric = value
    better = state.best_metric is None or (
        value < state.best_metric if rule.mode == "min" else value > state.best_metric
    )
    if better:
        state.best_metric, state.evals_without_improvement = value, 0
        return False
    state.evals_without_improvement += 1
    return rule.patience is not None and state.evals_without_improvement >= rule.patience


def _save(cfg: Config, accelerator, model, optimizer, scheduler, state: ckpt.TrainerState) -> None:
    if shards_state(accelerator):  # every rank writes its shards
        ckpt.save_sharded_checkpoint(accelerator, cfg.train.output_dir, scheduler, state)
    elif accelerator.is_main_process:
        ckpt.save_checkpoint(
            cfg.train.output_dir, accelerator.unwrap_model(model), optimizer, scheduler, state
        )
    if accelerator.is_main_process:
        ckpt.prune_checkpoints(
            cfg.train.output_dir, cfg.train.keep_last, cfg.train.keep_best, cfg.train.early_stopping.mode
        )
    accelerator.wait_for_everyone()


def _export(accelerator, model, tokenizer, data: MultiTaskData, folder: Path) -> Path:
    """The final model (full) or adapter (LoRA), with the tokenizer carrying the training chat template."""
    # Under ZeRO-3 and FSDP the weights are gathered from all ranks (a collective); elsewhere rank 0 has them.
    gathered = {"state_dict": accelerator.get_state_dict(model)} if shards_state(accelerator) else {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(folder, safe_serialization=True, **gathered)
        tokenizer.chat_template = data.template.chat_template()
        tokenizer.save_pretrained(folder)
        stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(data.stop_token)} - {None}
        generation = getattr(unwrapped, "generation_config", None)
        if generation is not None:
            generation.eos_token_id = sorted(stop_ids)
            generation.save_pretrained(folder)
    accelerator.wait_for_everyone()
    return folder


def _write_run_files(
    cfg: Config, out: Path, accelerator, data: MultiTaskData, plan: BatchPlan, total_steps: int
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "resolved_config.yaml")
    write_json(
        out / "environment.json", environment_snapshot(accelerator.num_processes, str(accelerator.device))
    )
    counts = data.epoch_counts()
    print(
        f"{len(data.tasks)} tasks, {sum(counts.values())} samples per epoch; global batch {plan.global_batch} = "
        f"micro-batch {plan.micro_batch} x accumulation {plan.accumulation} x {plan.world_size} process(es); "
        f"{total_steps} steps"
    )


class StopSignal:
    """Turns SIGTERM into a request to save and stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        with contextlib.suppress(ValueError):  # not the main thread: leave the default behaviour
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, accelerator) -> bool:
        """Whether any rank was asked to stop; every rank calls this after each step, so all stop together."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum") > 0)


@dataclass
class RunLog:
    """Progress bar, metrics.jsonl and TensorBoard; per-task train metrics averaged over each log interval.

    Each log line covers the steps since the previous one: `train/seconds` is their wall time on this
    process (data, collation, forward, backward, update, CoBa probes), less what ran inside `untimed()`,
    and the rates divide the interval's tokens by it.
    """

    cfg: Config
    out: Path
    accelerator: object
    data: MultiTaskData
    total_steps: int
    start_step: int = 0
    resumed: bool = False
    _interval: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        main = self.accelerator.is_main_process
        self.writer = (
            MetricsWriter(
                self.out,
                tensorboard=self.cfg.train.tensorboard,
                resume_from=self.start_step if self.resumed else None,
            )
            if main
            else None
        )
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            disable=not main,
            desc="train",
            dynamic_ncols=True,
        )
        self.clock = TrainClock(self.accelerator.device)

    def untimed(self):
        """A context whose time (evaluation, checkpoint saves) is not training time."""
        return self.clock.paused()

    def step(self, step: int, result: StepResult, lr: float) -> None:
        acc = self._interval
        acc["steps"] = acc.get("steps", 0) + 1
        acc["loss"] = acc.get("loss", 0.0) + result.loss
        acc["tokens"] = acc.get("tokens", 0) + result.num_tokens
        acc["input_tokens"] = acc.get("input_tokens", 0) + result.num_input_tokens
        for key, value in result.per_task.items():
            acc[key] = acc.get(key, 0) + value.cpu()
        self.bar.update(1)
        if step % self.cfg.train.log_every:
            return
        seconds = self.clock.lap()
        values = {
            "train/loss": acc["loss"] / acc["steps"],
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens_per_second": acc["input_tokens"] / max(seconds, 1e-9),
            "trained_tokens_per_second": acc["tokens"] / max(seconds, 1e-9),
            "train/seconds": seconds,
            "train/input_tokens": acc["input_tokens"],  # already summed over ranks by each step
        }
        if (peak := peak_memory_gib(self.accelerator.device)) is not None:
            values["train/max_memory_gib"] = peak
        values.update(self._per_task(acc))
        self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", tok_s=f"{values['tokens_per_second']:.0f}")
        self.write(step, values)
        self._interval = {}

    def _per_task(self, acc: dict) -> dict[str, float]:
        values = {}
        for task in self.data.tasks:
            k = task.task_id
            tokens = float(acc["num_tokens"][k]) if "num_tokens" in acc else 0.0
            if tokens:
                values[f"train/{task.name}/loss"] = float(acc["loss_sum"][k]) / tokens
                values[f"train/{task.name}/accuracy"] = float(acc["num_correct"][k]) / tokens
            values[f"train/{task.name}/tokens"] = tokens
            values[f"train/{task.name}/weight"] = (
                float(acc["weight"][k]) / acc["steps"] if "weight" in acc else 0.0
            )
        return values

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.write(step, values)
        if "valid/loss" in values and self.accelerator.is_main_process:
            self.bar.write(f"step {step}: valid/loss {values['valid/loss']:.4f}")

    def close(self, *, plots: bool) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            if plots:
                plot_task_curves(self.out, [t.name for t in self.data.tasks])
