"""What the throughput benchmark runs: the cases the flags select, in order, and each case's micro-batch
sizes and attention.

A case is a model shape, a fine-tuning method, a side (mftune, TRL's SFTTrainer, the plain loop) and a
setting (each side's `default`, its `fastest`, or the plain loop's `baseline`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from importlib import util

from workload import Profile

METHODS = ("full", "lora", "qlora")
SIDES = ("mftune", "trl", "plain")
SETTINGS = ("default", "fastest")
# 7B only with adapters: its bf16 weights, gradients and AdamW states alone take 61 GB of an 80 GB GPU.
FULL_FINETUNE_SHAPES = ("0.5b", "1.5b", "tiny")
PLAIN_METHODS = ("full", "lora")
PLAIN_BATCH = 8  # samples per padded micro-batch of the plain loop


@dataclass(frozen=True)
class Case:
    """One measurement: a model shape, a fine-tuning method, a side and a setting."""

    shape: str
    method: str
    side: str
    setting: str  # default | fastest | baseline (the plain loop)

    @property
    def name(self) -> str:
        return f"{self.shape}-{self.method}-{self.side}-{self.setting}"


def plan_cases(args: argparse.Namespace) -> list[Case]:
    """Every case the flags select, shape by shape (each shape's model is built once), defaults first."""
    cases = []
    for shape in args.shapes:
        methods = [m for m in args.methods if m != "full" or shape in FULL_FINETUNE_SHAPES]
        # Setting by setting: under a time budget the defaults of every method are measured first.
        for setting in args.settings:
            cases += [
                Case(shape, method, side, setting)
                for method in methods
                for side in ("mftune", "trl")
                if side in args.sides
            ]
        if "plain" in args.sides:
            cases += [Case(shape, m, "plain", "baseline") for m in methods if m in PLAIN_METHODS]
    return cases


def micro_batch_candidates(
    case: Case, profile: Profile, fastest: list[int] | None, fixed: dict[str, int]
) -> list[int]:
    """Micro-batch sizes to try, in order: packed rows per forward pass (padded samples for the plain loop).

    Defaults are each side's own: mftune's `train.micro_batch_size` (1), TRL's
    `per_device_train_batch_size` (8, halved while it does not fit); the plain loop's batches of 8.
    A fastest setting takes the side's size from `fixed` (`--fastest-micro SIDE=N`: no search), else
    tries `fastest`, or every power of two that divides the step's rows.
    """
    rows = profile.rows_per_step
    if case.side == "plain":
        return [PLAIN_BATCH]
    if case.side == "mftune" and case.setting == "default":
        return [1]
    if case.setting == "fastest" and case.side in fixed:
        return [fixed[case.side]] if rows % fixed[case.side] == 0 else []
    if case.setting == "fastest" and fastest:
        return [m for m in fastest if rows % m == 0]
    first = rows if case.setting == "fastest" else min(rows, 8)
    sizes = [first >> k for k in range(first.bit_length())]
    return [m for m in sizes if rows % m == 0]


def attention_setting(case: Case, args: argparse.Namespace) -> str:
    """The attention a side is asked for (mftune: `model.attention`; TRL: `attn_implementation`)."""
    if case.side == "mftune":
        return args.mftune_attention
    if case.side == "plain" or case.setting == "default":
        return "default" if case.side == "trl" else "sdpa"
    if args.trl_attention != "auto":
        return args.trl_attention
    return "flash_attention_2" if util.find_spec("flash_attn") else "default"


def side_sizes(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, int]:
    """`["mftune=4", "trl=1"]` as `{"mftune": 4, "trl": 1}`; a malformed pair is a usage error."""
    sizes = {}
    for pair in pairs:
        side, _, size = pair.partition("=")
        if side not in SIDES or not size.isdigit() or int(size) < 1:
            parser.error(f"--fastest-micro {pair!r}: expected SIDE=N with SIDE one of {', '.join(SIDES)}")
        sizes[side] = int(size)
    return sizes
