"""Benchmark of mftune's task weighting: its cost over a plain mean cross entropy on one CPU training step.

Builds a tiny random-weight llama and real packed micro-batches from the bundled `examples/data` tasks
(`prepare_data`, isolated packing), then times optimizer steps of, in one process, with the same model
weights at the start and the same batches:

- (a) `model(..., labels=labels)`: transformers' mean cross entropy over full (B, T, V) logits;
- (b) the decoder's hidden states, `lm_head_loss` (chunked, logits only at the targets), then `.mean()`:
  the same cross entropy as mftune's, without any weighting;
- (c) `mftune.train.step.train_step` for each strategy (`token`, `sample`, `task`, `task_sample`):
  step counts, coefficients, Σ c·ℓ and the per-task sums it logs.

Every variant owns a copy of the model (the same initial weights) and an AdamW optimizer, followed by
gradient clipping and a scheduler step as in `train_step`. The variants take turns step by step, in an
order that rotates, and each is compared with the reference step by step (the median of the per-step
ratios), so that the drift of a shared machine falls on all of them alike. The weighting alone (counts and
coefficients of a step, no model) is timed separately and reported as a share of a step: an end-to-end
difference of a few percent is within the noise of a busy machine, this share is not.

    python benchmarks/loss_overhead.py                        # 35 steps x 6 variants; minutes on 2 cores
    python benchmarks/loss_overhead.py --steps 6 --warmup 1   # a quick check
    python benchmarks/loss_overhead.py --threads 1            # on a machine that other jobs share

With more torch threads than idle cores, OpenMP threads wait on each other and steps get several times
slower and much noisier; the header prints the load average to check.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from benchlib import markdown_table, versions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
TASK_WEIGHTS = {"arithmetic": 1.0, "list_ops": 1.0, "write_function": 2.0, "write_test": 3.0}
STRATEGIES = ("token", "sample", "task", "task_sample")
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0


# --- setup ----------------------------------------------------------------------------------------


def write_config(workdir: Path, model_dir: Path, args: argparse.Namespace) -> Path:
    """An mftune config over the bundled example tasks, as a training run would read it."""
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "finetune": {"method": "full"},
        "data": {
            "tasks": {
                name: {"path": str(EXAMPLES / name), "loss_weight": weight}
                for name, weight in TASK_WEIGHTS.items()
            },
            "max_seq_len": args.max_seq_len,
            "packing": "isolated",
            "cache_dir": str(workdir / "cache"),
            "num_proc": 1,
            "valid_ratio": 0.0,
        },
        "train": {
            "output_dir": str(workdir / "run"),
            "learning_rate": LEARNING_RATE,
            "micro_batch_size": args.micro_batch,
            "global_batch_size": args.micro_batch * args.accumulation,
            "max_grad_norm": MAX_GRAD_NORM,
        },
    }
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def build_steps(cfg, num_steps: int) -> tuple[list[list[dict]], torch.Tensor]:
    """Collated micro-batches of the first `num_steps` optimizer steps of epoch 0, and the task weights.

    Returns:
        `(steps, task_weights)`: per step its micro-batches; the tasks' `loss_weight`s, shape (K,).
    """
    from mftune.data.pipeline import load_tokenizer, prepare_data
    from mftune.train.batches import BatchPlan, collate, rows_for_step, steps_in_epoch

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    plan = BatchPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    rows = data.epoch_rows(0)
    available = steps_in_epoch(len(rows), plan)
    if available < num_steps:
        raise SystemExit(f"the example data gives {available} steps, fewer than the {num_steps} asked")
    steps = [
        [collate(data, r, tokenizer.pad_token_id) for r in rows_for_step(rows, s, plan)]
        for s in range(num_steps)
    ]
    weights = torch.tensor([t.loss_weight for t in data.tasks], dtype=torch.float32)
    return steps, weights


class IdentityAccelerator:
    """What `train_step` asks of an `accelerate.Accelerator`, for one CPU process and nothing more."""

    device = torch.device("cpu")
    distributed_type = SimpleNamespace(name="NO")
    num_processes = 1

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model: torch.nn.Module):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


# --- the variants ---------------------------------------------------------------------------------


@dataclass
class Variant:
    """One way of training a step, on its own copy of the model and optimizer.

    `wall` and `cpu` hold the seconds of each timed step, in step order (the same steps for every variant).
    """

    name: str
    step: Callable[[list[dict]], None]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _trainer(base_model: torch.nn.Module):
    """A fresh copy of `base_model` with an AdamW optimizer and constant-rate scheduler."""
    from mftune.config import TrainConfig
    from mftune.train.optim import build_optimizer, build_scheduler

    model = copy.deepcopy(base_model).train()
    train_cfg = TrainConfig(learning_rate=LEARNING_RATE, lr_schedule="constant", warmup_steps=0)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg, total_steps=1_000_000)
    return model, optimizer, scheduler


def _finish(model, optimizer, scheduler) -> None:
    # What train_step does after the micro-batches: clip, update, schedule, clear.
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def full_logits_variant(base_model) -> Variant:
    """(a) transformers' own loss: full logits, mean cross entropy of each micro-batch, averaged."""
    model, optimizer, scheduler = _trainer(base_model)

    def step(micro_batches: list[dict]) -> None:
        for batch in micro_batches:
            out = model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                attention_mask=None,  # packed: block-causal attention from the position ids, as mftune
                labels=batch["labels"],
                use_cache=False,
            )
            (out.loss / len(micro_batches)).backward()
        _finish(model, optimizer, scheduler)

    return Variant("(a) HF forward(labels=...), full logits, mean CE", step)


def chunked_mean_variant(base_model, chunk_size: int) -> Variant:
    """(b) mftune's chunked cross entropy at the targets, plainly averaged: no counts, no coefficients."""
    from mftune.data.collate import IGNORE_INDEX
    from mftune.loss.cross_entropy import lm_head_loss
    from mftune.model.hidden import hidden_states, output_head

    model, optimizer, scheduler = _trainer(base_model)
    head = output_head(model)

    def step(micro_batches: list[dict]) -> None:
        for batch in micro_batches:
            labels = batch["labels"]
            is_target = labels[:, 1:] != IGNORE_INDEX
            hidden = hidden_states(model, batch, packed=True)[:, :-1][is_target]
            loss, _ = lm_head_loss(head, hidden, labels[:, 1:][is_target], chunk_size, config=model.config)
            (loss.mean() / len(micro_batches)).backward()
        _finish(model, optimizer, scheduler)

    return Variant("(b) hidden states + lm_head_loss, .mean()", step)


def mftune_variant(base_model, strategy: str, task_weights: torch.Tensor, chunk_size: int) -> Variant:
    """(c) `train_step` itself, with one of the weighting strategies."""
    from mftune.train.step import LossSpec, train_step

    model, optimizer, scheduler = _trainer(base_model)
    accelerator = IdentityAccelerator()
    spec = LossSpec(strategy, task_weights, chunk_size)

    def step(micro_batches: list[dict]) -> None:
        train_step(accelerator, model, optimizer, scheduler, micro_batches, spec, MAX_GRAD_NORM)

    return Variant(f"(c) train_step, loss={strategy}", step)


# --- measurement ----------------------------------------------------------------------------------


def run_interleaved(variants: list[Variant], steps: list[list[dict]], warmup: int) -> None:
    """Run every step with every variant, the variants in an order that rotates from step to step.

    The first `warmup` steps are not timed. Step i of every variant runs within seconds of step i of the
    others, so comparing them step by step cancels the drift of a shared machine.
    """
    for i, micro_batches in enumerate(steps):
        shift = i % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            variant.step(micro_batches)
            if i >= warmup:
                variant.wall.append(time.perf_counter() - wall)
                variant.cpu.append(time.process_time() - cpu)
        if (i + 1) % 5 == 0 or i + 1 == len(steps):
            print(f"  step {i + 1}/{len(steps)} of every variant done", file=sys.stderr, flush=True)


def weighting_only_ms(
    steps: list[list[dict]], strategy: str, task_weights: torch.Tensor, repeats: int
) -> tuple[float, float]:
    """Median ms per step of the weighting machinery without a model, on the timed steps.

    Returns:
        `(coefficients, bookkeeping)`: `count_step` + `reduce_counts` + per micro-batch `select_targets` and
        `token_coefficients`; then the same plus what `weighted_loss` adds around the cross entropy
        (Σ c·ℓ on a stand-in loss, `per_task_sums`, the weight mass).
    """
    from mftune.loss.weighting import (
        count_step,
        per_task_sums,
        reduce_counts,
        select_targets,
        token_coefficients,
    )

    num_tasks = len(task_weights)

    def coefficients(micro_batches: list[dict], bookkeeping: bool) -> None:
        counts = reduce_counts(count_step(micro_batches, num_tasks), lambda t: t)
        for batch in micro_batches:
            targets = select_targets(batch)
            c = token_coefficients(targets, counts, strategy, task_weights)
            if bookkeeping:
                loss = torch.ones(targets.num_targets)
                (c * loss).sum()
                per_task_sums(loss, loss > 0, targets, num_tasks)
                torch.zeros(num_tasks).index_add_(0, targets.task_ids, c)

    per_step: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):  # the two measurements alternate, so that drift falls on both
        for bookkeeping in (False, True):
            start = time.perf_counter()
            for micro_batches in steps:
                coefficients(micro_batches, bookkeeping)
            per_step[bookkeeping].append((time.perf_counter() - start) / len(steps))
    return _median_ms(per_step[False]), _median_ms(per_step[True])


# --- report ---------------------------------------------------------------------------------------


def _median_ms(seconds: list[float]) -> float:
    return 1000 * statistics.median(seconds)


def _paired(times: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile over the steps of `times[i] / reference[i] - 1`, in %."""
    ratios = [100 * (t / r - 1) for t, r in zip(times, reference, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high


def variants_table(variants: list[Variant], weighting: dict[str, tuple[float, float]]) -> str:
    """One row per variant; differences are step-by-step against (b) and (a), the median and its IQR."""
    full, chunked = variants[0], variants[1]
    header = ["variant", "wall ms/step", "CPU ms/step", "vs (b), wall", "vs (b), CPU", "vs (a), wall"]
    header += ["weighting alone, ms (% of step)", "+ logging sums, ms (% of step)"]
    rows = []
    for variant in variants:
        wall = _median_ms(variant.wall)
        cells = [variant.name, f"{wall:.0f}", f"{_median_ms(variant.cpu):.0f}"]
        for times, reference in (
            (variant.wall, chunked.wall),
            (variant.cpu, chunked.cpu),
            (variant.wall, full.wall),
        ):
            median, low, high = _paired(times, reference)
            cells.append("-" if times is reference else f"{median:+.1f}% [{low:+.1f}, {high:+.1f}]")
        strategy = variant.name.rsplit("loss=", 1)[-1] if "loss=" in variant.name else None
        if strategy in weighting:
            cells += [f"{ms:.2f} ({100 * ms / wall:.2f}%)" for ms in weighting[strategy]]
        else:
            cells += ["-", "-"]
        rows.append(cells)
    return markdown_table(header, rows, right=range(1, 8))


def describe_steps(steps: list[list[dict]]) -> str:
    rows = sum(b["input_ids"].shape[0] for s in steps for b in s)
    tokens = sum(int(b["attention_mask"].sum()) for s in steps for b in s)
    capacity = sum(b["input_ids"].numel() for s in steps for b in s)
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for s in steps for b in s)
    samples = sum(int(b["sample_ids"].max()) + 1 for s in steps for b in s)
    return (
        f"{len(steps)} steps of {len(steps[0])} micro-batches; per step: {rows / len(steps):.0f} rows, "
        f"{tokens / len(steps):,.0f} tokens ({tokens / capacity:.1%} of the padded capacity), "
        f"{samples / len(steps):.0f} samples, {targets / len(steps):,.0f} trained targets"
    )


# --- run ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mftune.config import load_config
    from mftune.tiny import build_tiny_model

    torch.manual_seed(args.seed)
    model_dir = build_tiny_model(
        workdir / "model", "llama", hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    cfg = load_config(write_config(workdir, model_dir, args))
    steps, task_weights = build_steps(cfg, args.warmup + args.steps)
    chunk_size = 2048  # LossSpec's default, as a training run uses

    variants = [full_logits_variant(base), chunked_mean_variant(base, chunk_size)]
    variants += [mftune_variant(base, s, task_weights, chunk_size) for s in STRATEGIES]
    params = sum(p.numel() for p in base.parameters())

    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {_load()}"
    )
    print(", ".join(f"{k} {v}" for k, v in versions(("torch", "transformers")).items() if v))
    print(
        f"model: tiny llama, hidden {args.hidden_size}, {args.num_layers} layers, vocab {base.config.vocab_size}, "
        f"{params / 1e6:.2f}M parameters, fp32, sdpa"
    )
    print(
        f"data: {len(task_weights)} example tasks, isolated packing at {args.max_seq_len}; {describe_steps(steps)}"
    )
    print(
        f"timing: {args.warmup} warm-up + {args.steps} timed steps per variant, interleaved step by step",
        flush=True,
    )

    start = time.perf_counter()
    run_interleaved(variants, steps, args.warmup)
    timed_steps = steps[args.warmup :]
    weighting = {
        s: weighting_only_ms(timed_steps, s, task_weights, args.weighting_repeats) for s in STRATEGIES
    }
    print(f"measured in {time.perf_counter() - start:.0f} s; load average now {_load()}\n")
    print(variants_table(variants, weighting))
    chunked = _median_ms(variants[1].wall)
    costliest = max(book for _, book in weighting.values())
    end_to_end = [_paired(v.wall, variants[1].wall)[0] for v in variants[2:]]
    print(
        "\nvs columns: median over the timed steps of (variant / reference - 1), step by step, [25th, 75th "
        "percentile]. Weighting alone: count_step + reduce_counts + select_targets + token_coefficients of a "
        "step, no model; + logging sums adds Σ c·ℓ, per_task_sums and the weight mass of weighted_loss."
    )
    print(
        f"goal: weighting < 3% of a step over a plain mean cross entropy. Weighting and logging sums alone "
        f"cost at most {costliest:.2f} ms = {100 * costliest / chunked:.2f}% of a (b) step; end to end, "
        f"train_step vs (b) measured {min(end_to_end):+.1f}% to {max(end_to_end):+.1f}% (medians; see their "
        "spread above for this machine's noise)."
    )


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256, help="tiny llama hidden size (default 256)")
    parser.add_argument("--num-layers", type=int, default=4, help="tiny llama layers (default 4)")
    parser.add_argument(
        "--steps", type=int, default=30, help="timed optimizer steps per variant (default 30)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (default 5)")
    parser.add_argument("--max-seq-len", type=int, default=256, help="packed row length (default 256)")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per micro-batch (default 8)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per step (default 2)")
    parser.add_argument(
        "--weighting-repeats", type=int, default=50, help="passes of the weighting-only timing (default 50)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="model weights seed")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1, --warmup at least 0")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="mftune-loss-bench-") as workdir:
        run(args, Path(workdir))


if __name__ == "__main__":
    main()
