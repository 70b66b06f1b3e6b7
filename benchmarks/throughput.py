"""Training throughput on one GPU: mftune against TRL's SFTTrainer and a plain transformers + peft loop.

Everything runs in one command, on the same synthetic chat data and the same random-weight models:

- data: one user turn and one assistant turn per sample, lognormal lengths (median 350 tokens, clipped to
  [32, max length]), written as a `messages` jsonl and tokenized once by mftune's own pipeline; TRL and the
  plain loop get exactly those token ids and labels (trained = mftune's assistant span);
- models: Qwen2.5-0.5B, -1.5B and -7B shapes built from a transformers config on the GPU (random weights,
  no download), saved once per shape in bf16; QLoRA loads that folder quantised (4-bit NF4);
- sides: mftune (`mftune.config.load_config` + `mftune.train.loop.train`, as `mftune train` runs it), TRL's
  `SFTTrainer` (pre-tokenized `datasets.Dataset`, packing), and the plain loop (padded batches of 8, sdpa,
  the model's own loss); each at its default settings (gradient checkpointing on) and at its fastest
  (checkpointing off; TRL with liger-kernel and flash-attn when installed; the micro-batch that runs fastest);
- every (shape, method, side, setting) in its own subprocess: fresh CUDA memory statistics, and an
  out-of-memory case is recorded as OOM while the run goes on.

It prints real (non-padding) input tokens per second over the timed steps, MFU, peak GPU memory and the
mftune/TRL ratios, and writes every number to a JSON file. The FLOP count behind MFU is printed with the
table; docs/performance.md explains it.

    python benchmarks/throughput.py --out throughput.json                  # the whole grid, H100 80GB
    python benchmarks/throughput.py --shapes 0.5b --methods lora --steps 10
    python benchmarks/throughput.py --smoke                                # CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import util
from pathlib import Path

import numpy as np

_SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
# Qwen2.5 base models, their published config.json sizes; `tiny` is --smoke's, with the shipped tokenizer's
# vocabulary.
SHAPES: dict[str, dict] = {
    name: dict(zip(_SHAPE_FIELDS, sizes, strict=True))
    for name, sizes in {
        "0.5b": (896, 4864, 24, 14, 2, 151936, True),
        "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
        "7b": (3584, 18944, 28, 28, 4, 152064, False),
        "tiny": (64, 128, 2, 4, 2, 4096, True),
    }.items()
}
GPU_SHAPES = ("0.5b", "1.5b", "7b")
METHODS = ("full", "lora", "qlora")
SIDES = ("mftune", "trl", "plain")
SETTINGS = ("default", "fastest")
# 7B only with adapters: its bf16 weights, gradients and AdamW states alone take 61 GB of an 80 GB GPU.
FULL_FINETUNE_SHAPES = ("0.5b", "1.5b", "tiny")
PLAIN_METHODS = ("full", "lora")
PLAIN_BATCH = 8  # samples per padded micro-batch of the plain loop
LORA_RANK, LORA_ALPHA = 16, 32
LEARNING_RATE = 1e-5
MIN_LEN, LENGTH_SIGMA = 32, 0.9
# Role markers, stop token and newlines take 8 tokens; a turn's first word (no space before it) may split
# into 2-3 tokens. Lengths are aimed with this and then measured.
TEMPLATE_TOKENS = 12
DATA_MARGIN = 1.3  # tokens generated over what the steps need, so no side runs out within an epoch
TASK = "synthetic"
# Outcomes that do not fail the run: a case that ran out of memory, or that the time budget skipped or stopped.
NOT_FAILURES = ("ok", "OOM", "skipped", "out_of_time")


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run."""

    steps: int
    warmup_steps: int
    tokens_per_step: int
    max_len: int
    median_len: int
    device: str
    dtype: str

    @property
    def rows_per_step(self) -> int:
        """Packed rows of `max_len` tokens per optimizer step (mftune's global batch, TRL's batch)."""
        return self.tokens_per_step // self.max_len


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


# --- data ------------------------------------------------------------------------------------------


def single_token_words(tokenizer) -> list[str]:
    """Lower-case words that the tokenizer encodes, after a space, as exactly one token."""
    return sorted(
        token[1:]
        for token in tokenizer.get_vocab()
        if token.startswith("Ġ") and len(token) > 3 and token[1:].isalpha() and token[1:].islower()
    )


def draw_lengths(profile: Profile, rng: np.random.Generator) -> np.ndarray:
    """Sample lengths in tokens, lognormal around `median_len`, enough for every step of every side."""
    needed = DATA_MARGIN * (profile.warmup_steps + profile.steps) * profile.tokens_per_step
    lengths: list[int] = []
    while sum(lengths) < needed:
        drawn = rng.lognormal(math.log(profile.median_len), LENGTH_SIGMA, 256)
        lengths += np.clip(drawn, MIN_LEN, profile.max_len).astype(int).tolist()
    return np.asarray(lengths)


def write_conversations(path: Path, lengths: np.ndarray, words: list[str], rng: np.random.Generator) -> None:
    """One `messages` record per length: a user turn of 20-50% of the words, then the assistant's answer."""
    vocab = np.asarray(words, dtype=object)
    with path.open("w", encoding="utf-8") as f:
        for length in lengths.tolist():
            content = max(length - TEMPLATE_TOKENS, 4)
            user = max(int(content * rng.uniform(0.2, 0.5)), 1)
            turns = [("user", user), ("assistant", content - user)]
            messages = [
                {"role": role, "content": " ".join(vocab[rng.integers(0, len(vocab), n)].tolist())}
                for role, n in turns
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def mftune_config(
    workdir: Path, model_dir: Path, run_dir: Path, profile: Profile, overrides: dict | None = None
) -> dict:
    """The config of an mftune run over the synthetic task, as a user would write it.

    Evaluation has nothing to score (no validation split), checkpoints are only the final one that
    `train` always writes, and every step is logged, so `metrics.jsonl` holds per-step throughput.
    """
    total = profile.warmup_steps + profile.steps
    raw = {
        "model": {"name_or_path": str(model_dir), "tokenizer": str(workdir / "tokenizer")},
        "finetune": {"method": "full", "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA}},
        "data": {
            "tasks": {TASK: {"path": str(workdir / "data" / f"{TASK}.jsonl")}},
            "max_seq_len": profile.max_len,
            "packing": "isolated",
            "valid_ratio": 0.0,
            "cache_dir": str(workdir / "cache"),
            "num_proc": 1,
        },
        "train": {
            "output_dir": str(run_dir),
            "max_steps": total,
            "global_batch_size": profile.rows_per_step,
            "learning_rate": LEARNING_RATE,
            "lr_schedule": "constant",
            "log_every": 1,
            "eval_every": total,
            "save_every": 10**9,
            "keep_last": 1,
            "keep_best": 0,
            "resume": "never",
            "tensorboard": False,
            "plots": False,
        },
    }
    for section, values in (overrides or {}).items():
        raw[section].update(values)
    return raw


def build_corpus(workdir: Path, profile: Profile, seed: int) -> dict:
    """Write the synthetic task, tokenize it with mftune's pipeline and save its samples for the other sides.

    Returns:
        A summary: number of samples, tokens, mean length, Σ s² / Σ s (for attention FLOPs), trained share.
    """
    import yaml
    from transformers import AutoTokenizer

    from mftune.config import load_config
    from mftune.data.pipeline import load_tokenizer, prepare_data
    from mftune.tiny import tokenizer_path

    AutoTokenizer.from_pretrained(tokenizer_path()).save_pretrained(workdir / "tokenizer")
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = single_token_words(AutoTokenizer.from_pretrained(workdir / "tokenizer"))
    write_conversations(workdir / "data" / f"{TASK}.jsonl", draw_lengths(profile, rng), words, rng)

    # Tokenized exactly as a training run does (the cases then read the same cache).
    config_path = workdir / "tokenize.yaml"
    raw = mftune_config(workdir, workdir / "tokenizer", workdir / "runs" / "tokenize", profile)
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path)
    tokenized = prepare_data(cfg, load_tokenizer(cfg.model)).tasks[0].tokenized
    np.savez(
        workdir / "samples.npz",
        input_ids=tokenized.input_ids,
        trained=tokenized.trained,
        offsets=tokenized.offsets,
    )
    lengths = tokenized.lengths.astype(np.float64)
    return {
        "samples": len(tokenized),
        "dropped_overlong": int(tokenized.counts.get("overlong", 0)),
        "tokens": int(lengths.sum()),
        "mean_len": float(lengths.mean()),
        "median_len": float(np.median(lengths)),
        "max_len": int(lengths.max()),
        "attention_len": float((lengths**2).sum() / lengths.sum()),
        "trained_share": float(tokenized.trained.mean()),
    }


def load_samples(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, trained mask) of every sample that mftune tokenized, in file order."""
    saved = np.load(path)
    ids, trained, offsets = saved["input_ids"], saved["trained"], saved["offsets"]
    return [(ids[a:b], trained[a:b]) for a, b in itertools.pairwise(offsets.tolist())]


# --- FLOPs -----------------------------------------------------------------------------------------


def model_counts(shape: dict) -> dict:
    """Parameter counts of a shape, from a model built on the meta device (no memory, no time).

    Returns:
        `matmul`: every parameter but the input embedding, with the output head counted even when it
        shares the embedding's weight (the lookup is free, the head is a matmul); `adapter`: LoRA
        parameters at rank `LORA_RANK` on every linear layer but the head; `layers`, `attention_width`
        (query heads × head dim).
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    matmul = sum(p.numel() for p in model.parameters() if p is not embedding)
    if head.weight is embedding:
        matmul += head.weight.numel()
    adapter = sum(
        LORA_RANK * (m.in_features + m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "matmul": matmul,
        "adapter": adapter,
        "layers": config.num_hidden_layers,
        "attention_width": config.num_attention_heads * head_dim,
    }


def flops_per_token(counts: dict, method: str, attention_len: float) -> float:
    """Model FLOPs of one trained-on input token (forward and backward; recomputation not counted).

    Dense: 6·N for a full fine-tune (forward 2N, backward 4N: gradients of activations and of weights);
    4·N + 6·N_adapter with frozen base weights (no weight gradients but the adapters'). Attention: a causal
    sample of length s costs 2·2·s²·d per layer in QKᵀ and AV, halved by the mask, ×3 with backward:
    6·L·d·s² per sample, i.e. 6·L·d·(Σ s² / Σ s) per token over the data set.
    """
    dense = 6 * counts["matmul"] if method == "full" else 4 * counts["matmul"] + 6 * counts["adapter"]
    return dense + 6 * counts["layers"] * counts["attention_width"] * attention_len


# --- cases (in their own subprocess) ---------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    import torch

    from mftune.train.tracking import peak_memory_gib

    return peak_memory_gib(torch.device(device))


def _reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def describe_model(model) -> dict:
    """What a side actually trains with: attention implementation, checkpointing, dtypes, trainable size."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    # transformers 5.2x renamed gradient checkpointing to activation checkpointing (the old name warns).
    renamed = hasattr(type(base), "is_activation_checkpointing")
    checkpointing = "is_activation_checkpointing" if renamed else "is_gradient_checkpointing"
    return {
        "attention": getattr(base.config, "_attn_implementation", None),
        "gradient_checkpointing": bool(getattr(base, checkpointing, False)),
        "dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
        "trainable_dtype": str(trainable[0].dtype).removeprefix("torch.") if trainable else None,
        "trainable_parameters": sum(p.numel() for p in trainable),
    }


@contextlib.contextmanager
def observe_loaded_model(observed: dict) -> Iterator[None]:
    """Record `describe_model` of the model that `mftune.train.loop.train` loads, without changing it.

    `train` builds its model internally and returns only the output folder; wrapping the loader it calls
    is the one way to see which attention and checkpointing the run really used.
    """
    import mftune.model.load as load

    real = load.load_model

    def load_model(*args, **kwargs):
        model = real(*args, **kwargs)
        observed.update(describe_model(model))
        return model

    load.load_model = load_model
    try:
        yield
    finally:
        load.load_model = real


@contextlib.contextmanager
def skip_model_writes() -> Iterator[None]:
    """Leave out the checkpoint and the final model that `train` writes after its last step.

    They happen after the timed steps, so they change no number, but at 1.5B a full fine-tune's
    checkpoint with its optimizer state is ~20 GB of disk writes per case; TRL's side saves nothing
    (`save_strategy="no"`).
    """
    import mftune.train.loop as loop

    real = loop._save, loop._export
    loop._save = lambda *args, **kwargs: None
    loop._export = lambda accelerator, model, tokenizer, data, folder: folder
    try:
        yield
    finally:
        loop._save, loop._export = real


def mftune_steps(run_dir: Path) -> list[dict]:
    """Per logged step of `metrics.jsonl`: input (non-padding) tokens, seconds and, on CUDA, peak GiB so far.

    mftune logs them on every log line: `train/input_tokens`, `train/seconds` (the steps' wall time, with
    evaluation and checkpoint saves left out) and `train/max_memory_gib` (CUDA only).
    """
    from mftune.train.tracking import read_metrics

    return [
        {
            "step": row["step"],
            "tokens": row["train/input_tokens"],
            "seconds": row["train/seconds"],
            "peak_gib": row.get("train/max_memory_gib"),
        }
        for row in read_metrics(run_dir)
        if "train/seconds" in row
    ]


def run_mftune(spec: dict) -> dict:
    """`mftune train` in-process: the case's config through `load_config` and `train`."""
    import yaml

    from mftune.config import load_config
    from mftune.train.loop import train

    profile, run_dir = Profile(**spec["profile"]), Path(spec["run_dir"])
    overrides = {
        "model": {
            "attention": spec["attention"],
            "gradient_checkpointing": "off" if spec["setting"] == "fastest" else "on",
        },
        # Fastest: adapters in the model's dtype (bf16) rather than peft's float32 default.
        "finetune": {
            "method": spec["method"],
            "lora": {
                "r": LORA_RANK,
                "alpha": LORA_ALPHA,
                "adapter_dtype": "model" if spec["setting"] == "fastest" else "float32",
            },
        },
        "train": {"micro_batch_size": spec["micro_batch"]},
    }
    raw = mftune_config(Path(spec["workdir"]), Path(spec["model_dir"]), run_dir, profile, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / f"{run_dir.name}.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(run_dir.parent / f"{run_dir.name}.yaml")
    observed: dict = {}
    with observe_loaded_model(observed), skip_model_writes():
        train(cfg)
    steps = mftune_steps(run_dir)
    # The peak of this process (a fresh one per case) up to each log line, so that of the last timed step.
    peaks = [s["peak_gib"] for s in steps if s["step"] > profile.warmup_steps and s["peak_gib"] is not None]
    return {
        "steps": steps,
        "peak_gib": max(peaks, default=None),
        "accumulation": profile.rows_per_step // spec["micro_batch"],
        "metrics_path": str(run_dir / "metrics.jsonl"),
        **observed,
    }


def _trl_step_timer(device: str):
    """A TrainerCallback that records input tokens and seconds of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict] = []
            self._clock, self._tokens = 0.0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            self._clock, self._tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)  # mftune's step ends on a host sync too (its loss is read back)
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            self.steps.append(
                {"step": state.global_step, "tokens": tokens - self._tokens, "seconds": now - self._clock}
            )
            self._clock, self._tokens = now, tokens

    return StepTimer()


def run_trl(spec: dict) -> dict:
    """TRL's SFTTrainer on the same token ids and labels, packed (best-fit decreasing, padding-free)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    profile, fastest = Profile(**spec["profile"]), spec["setting"] == "fastest"
    samples = load_samples(Path(spec["workdir"]) / "samples.npz")
    dataset = Dataset.from_dict(
        {
            "input_ids": [ids.tolist() for ids, _ in samples],
            "labels": [np.where(trained, ids, -100).tolist() for ids, trained in samples],
        }
    )
    init = {"dtype": profile.dtype}
    if spec["attention"] != "default":
        init["attn_implementation"] = spec["attention"]
    liger = fastest and util.find_spec("liger_kernel") is not None
    args = SFTConfig(
        output_dir=spec["run_dir"],
        max_length=profile.max_len,
        packing=True,
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=profile.rows_per_step // spec["micro_batch"],
        max_steps=profile.warmup_steps + profile.steps,
        learning_rate=LEARNING_RATE,
        bf16=profile.dtype == "bfloat16",
        gradient_checkpointing=not fastest,
        use_liger_kernel=liger,
        include_num_input_tokens_seen="non_padding",
        model_init_kwargs=init,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    timer = _trl_step_timer(profile.device)
    trainer = SFTTrainer(
        model=spec["model_dir"],
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(Path(spec["workdir"]) / "tokenizer"),
        peft_config=_peft_lora() if spec["method"] != "full" else None,
        quantization_config=_bnb_config(torch) if spec["method"] == "qlora" else None,
        callbacks=[timer],
    )
    _reset_peak(profile.device)
    trainer.train()
    return {
        "steps": timer.steps,
        "peak_gib": _peak_gib(profile.device),
        "accumulation": args.gradient_accumulation_steps,
        "liger_kernel": liger,
        "padding_free": bool(trainer.padding_free),
        **describe_model(trainer.model),
    }


def _peft_lora():
    """LoRA at mftune's default rank and alpha on every linear layer but the head, peft's other defaults."""
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")


def _bnb_config(torch):
    """4-bit NF4 with double quantisation and bf16 compute and storage: what mftune's qlora loads."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def plain_batches(samples: list, pad_id: int, micro: int) -> Iterator[dict]:
    """Padded micro-batches of `micro` samples in file order, endlessly; labels -100 where not trained."""
    import torch

    for start in itertools.count(0, micro):
        chunk = [samples[(start + i) % len(samples)] for i in range(micro)]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((micro, width), pad_id, dtype=torch.long)
        labels = torch.full((micro, width), -100, dtype=torch.long)
        mask = torch.zeros((micro, width), dtype=torch.long)
        for row, (ids, trained) in enumerate(chunk):
            n = len(ids)
            input_ids[row, :n] = torch.from_numpy(ids.astype(np.int64))
            labels[row, :n] = torch.from_numpy(np.where(trained, ids, -100).astype(np.int64))
            mask[row, :n] = 1
        yield {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def run_plain(spec: dict) -> dict:
    """A plain transformers + peft loop: padded batches, sdpa, the model's own (full-logits) loss."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    profile = Profile(**spec["profile"])
    samples = load_samples(Path(spec["workdir"]) / "samples.npz")
    pad_id = AutoTokenizer.from_pretrained(Path(spec["workdir"]) / "tokenizer").pad_token_id
    mean_len = sum(len(ids) for ids, _ in samples) / len(samples)
    accumulation = max(1, round(profile.tokens_per_step / (spec["micro_batch"] * mean_len)))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=getattr(torch, profile.dtype), attn_implementation="sdpa"
    ).to(profile.device)
    model.config.use_cache = False
    if spec["method"] == "lora":
        model = get_peft_model(model, _peft_lora())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=profile.device == "cuda")
    batches = plain_batches(samples, pad_id, spec["micro_batch"])
    _reset_peak(profile.device)
    steps = []
    for step in range(1, profile.warmup_steps + profile.steps + 1):
        _sync(profile.device)
        start, tokens = time.perf_counter(), 0
        for _ in range(accumulation):
            batch = {k: v.to(profile.device) for k, v in next(batches).items()}
            (model(**batch).loss / accumulation).backward()
            tokens += int(batch["attention_mask"].sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(profile.device)
        steps.append({"step": step, "tokens": tokens, "seconds": time.perf_counter() - start})
    return {
        "steps": steps,
        "peak_gib": _peak_gib(profile.device),
        "accumulation": accumulation,
        **describe_model(model),
    }


RUNNERS = {"mftune": run_mftune, "trl": run_trl, "plain": run_plain}


def run_case(spec_path: Path) -> None:
    """Entry point of a case subprocess: run it and write its raw result (or OOM) next to its spec."""
    import torch

    spec = json.loads(spec_path.read_text())
    try:
        result = {"status": "ok", **RUNNERS[spec["side"]](spec)}
    except torch.OutOfMemoryError as err:
        result = {"status": "OOM", "error": str(err).splitlines()[0]}
    Path(spec["result_path"]).write_text(json.dumps(result, indent=1))


def build_model(spec: dict) -> dict:
    """A random-weight model of the shape, saved with the tokenizer; returns the device's name.

    The model is built on the benchmark's device (a 7B model takes minutes to initialise on a CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    config = Qwen2Config(
        **spec["shape"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(spec["device"]):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]))
    model.save_pretrained(spec["model_dir"])
    tokenizer.save_pretrained(spec["model_dir"])
    device = torch.cuda.get_device_name() if spec["device"] == "cuda" else platform.processor() or "cpu"
    return {"device_name": device}


def prepare_model(spec_path: Path) -> None:
    """Entry point of the model subprocess: `build_model`, its result written next to its spec."""
    spec = json.loads(spec_path.read_text())
    Path(spec["result_path"]).write_text(json.dumps(build_model(spec)))


# --- the parent: plan, run, report -----------------------------------------------------------------


@dataclass
class Runner:
    """Runs case subprocesses in `workdir` and keeps their results."""

    workdir: Path
    profile: Profile
    args: argparse.Namespace
    results: list[dict] = field(default_factory=list)
    deadline: float = math.inf  # `time.monotonic()` past which nothing runs (`--time-budget`)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self, case: Case) -> dict | None:
        """A `skipped` result if the case would not finish within the time left, else None.

        A case is expected to take as long as the longest one of its shape so far (the same model
        loads, the same steps), or `--case-estimate` seconds for the first of a shape.
        """
        walls = [r.get("wall_seconds", 0) for r in self.results if r["shape"] == case.shape]
        needed = max(walls, default=self.args.case_estimate)
        if self.time_left() >= needed:
            return None
        left = max(self.time_left(), 0)
        return {
            **asdict(case),
            "status": "skipped",
            "error": f"time budget: {left:.0f} s left, ~{needed:.0f} s needed",
        }

    def subprocess(self, flag: str, spec: dict, name: str) -> dict:
        """Run this script with `flag spec.json`; its result, or a status saying why there is none.

        It is stopped at `--case-timeout` (status `timeout`) or when the time budget runs out
        (`out_of_time`), whichever comes first.
        """
        for folder in ("specs", "logs", "results"):
            (self.workdir / folder).mkdir(exist_ok=True)
        spec_path = self.workdir / "specs" / f"{name}.json"
        result_path = self.workdir / "results" / f"{name}.json"
        result_path.unlink(missing_ok=True)
        spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}, indent=1))
        log = self.workdir / "logs" / f"{name}.log"
        offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env = {**os.environ, **offline}
        if self.args.threads:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        budget_binds = self.time_left() < self.args.case_timeout
        try:
            with log.open("w") as out:
                subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), flag, str(spec_path)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=max(min(self.args.case_timeout, self.time_left()), 1),
                    check=False,
                )
        except subprocess.TimeoutExpired:
            if budget_binds:
                return {"status": "out_of_time", "error": f"stopped at the time budget; log: {log}"}
            return {"status": "timeout", "error": f"over {self.args.case_timeout} s; log: {log}"}
        if result_path.exists():
            return json.loads(result_path.read_text())
        tail = log.read_text(errors="replace").splitlines()[-15:]
        if any("out of memory" in line.lower() for line in tail):
            return {"status": "OOM", "error": tail[-1]}
        print("\n".join(tail), file=sys.stderr)
        return {"status": "error", "error": tail[-1] if tail else "no output", "log": str(log)}

    def model(self, shape_name: str, shape: dict) -> tuple[Path, str] | None:
        """A saved random-weight model of the shape and the device's name; None if time ran out."""
        model_dir = self.workdir / "models" / shape_name
        spec = {
            "shape": shape,
            "model_dir": str(model_dir),
            "tokenizer_dir": str(self.workdir / "tokenizer"),
            "device": self.profile.device,
            "dtype": self.profile.dtype,
        }
        if self.profile.device == "cuda":  # the parent never touches the GPU: its memory stays the cases'
            result = self.subprocess("--prepare-model", spec, f"model-{shape_name}")
        else:
            result = build_model(spec)
        if result.get("status") == "out_of_time":
            return None
        if "device_name" not in result:
            raise SystemExit(f"could not build the {shape_name} model: {result.get('error')}")
        return model_dir, result["device_name"]

    def measure(self, case: Case, model_dir: Path, micro: int, steps: int, tag: str) -> dict:
        """One run of a case at one micro-batch size; the result summarised over its timed steps."""
        name = f"{case.name}-mb{micro}{tag}"
        profile = Profile(**{**asdict(self.profile), "steps": steps})
        spec = {
            **asdict(case),
            "profile": asdict(profile),
            "workdir": str(self.workdir),
            "model_dir": str(model_dir),
            "run_dir": str(self.workdir / "runs" / name),
            "micro_batch": micro,
            "attention": attention_setting(case, self.args),
        }
        started = time.perf_counter()
        raw = self.subprocess("--run-case", spec, name)
        result = {**asdict(case), "micro_batch": micro, **summarise(raw, profile)}
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        return result

    def run(self, case: Case, model_dir: Path) -> dict:
        """Measure a case: the first micro-batch that fits (default), or the fastest that fits (fastest).

        A fastest search times `--probe-steps` steps at each size, then measures the fastest in full.
        A TRL case without trl installed, or one that would not fit in the time budget, is skipped.
        """
        if case.side == "trl" and not (util.find_spec("trl") and util.find_spec("datasets")):
            return {**asdict(case), "status": "skipped", "error": "trl or datasets not installed"}
        if skipped := self.out_of_time(case):
            return skipped
        candidates = micro_batch_candidates(
            case, self.profile, self.args.micro_batches, self.args.fastest_micro
        )
        search = case.setting == "fastest" and len(candidates) > 1
        tried: list[dict] = []
        for micro in candidates:
            steps = self.args.probe_steps if search else self.profile.steps
            result = self.measure(case, model_dir, micro, steps, "-probe" if search else "")
            tried.append(result)
            if result["status"] == "ok" and not search:
                break
        fitting = [r for r in tried if r["status"] == "ok"]
        if search and fitting:
            best = max(fitting, key=lambda r: r["tps"])
            final = self.measure(case, model_dir, best["micro_batch"], self.profile.steps, "")
        elif fitting:
            final = fitting[0]
        elif tried:
            final = tried[-1]
        else:
            final = {**asdict(case), "status": "skipped", "error": "no micro-batch size divides the step"}
        final["tried"] = [{k: r.get(k) for k in ("micro_batch", "status", "tps")} for r in tried]
        return final


def attention_setting(case: Case, args: argparse.Namespace) -> str:
    """The attention a side is asked for (mftune: `model.attention`; TRL: `attn_implementation`)."""
    if case.side == "mftune":
        return args.mftune_attention
    if case.side == "plain" or case.setting == "default":
        return "default" if case.side == "trl" else "sdpa"
    if args.trl_attention != "auto":
        return args.trl_attention
    return "flash_attention_2" if util.find_spec("flash_attn") else "default"


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


def summarise(raw: dict, profile: Profile) -> dict:
    """Status, timed tokens per second and peak memory of a raw case result."""
    if raw.get("status") != "ok":
        return {"status": raw.get("status", "error"), "error": raw.get("error"), "log": raw.get("log")}
    steps = raw["steps"]
    expected = profile.warmup_steps + profile.steps
    timed = [s for s in steps if s["step"] > profile.warmup_steps]
    out = {k: v for k, v in raw.items() if k != "steps"}
    out["steps_logged"] = len(steps)
    if len(steps) != expected or not timed:
        return {**out, "status": "error", "error": f"{len(steps)} steps logged, {expected} expected"}
    tokens, seconds = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
    return {**out, "timed_steps": len(timed), "tokens": tokens, "seconds": seconds, "tps": tokens / seconds}


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


def add_mfu_and_ratios(results: list[dict], flops: dict[tuple[str, str], float], peak_tflops: float) -> None:
    """MFU of every measured case, and on mftune rows the speed and memory ratios against TRL."""
    for r in results:
        r["flops_per_token"] = flops[r["shape"], r["method"]]
        if r["status"] == "ok":
            r["mfu"] = r["tps"] * r["flops_per_token"] / (peak_tflops * 1e12)
    trl = {(r["shape"], r["method"], r["setting"]): r for r in results if r["side"] == "trl"}
    for r in results:
        other = trl.get((r["shape"], r["method"], r["setting"]), {"status": "absent"})
        if r["side"] != "mftune" or not r["status"] == other["status"] == "ok":
            continue
        r["speed_vs_trl"] = r["tps"] / other["tps"]
        if r.get("peak_gib") and other.get("peak_gib"):
            r["memory_vs_trl"] = r["peak_gib"] / other["peak_gib"]


def table(results: list[dict]) -> str:
    """The results as a markdown table, one row per case."""
    lines = [
        "| shape | method | setting | side | attention | ckpt | micro x acc | tok/s | MFU | peak GiB "
        "| mftune/TRL tok/s | mftune/TRL memory |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ok = r["status"] == "ok"
        cells = [r["shape"], r["method"], r["setting"], r["side"]]
        cells += [str(r.get("attention", "-")), _yes_no(r.get("gradient_checkpointing"))]
        cells.append(f"{r['micro_batch']} x {r['accumulation']}" if ok else "-")
        cells.append(f"{r['tps']:,.0f}" if ok else r["status"])
        cells.append(f"{r['mfu']:.1%}" if ok else "-")
        cells.append(f"{r['peak_gib']:.1f}" if ok and r.get("peak_gib") is not None else "-")
        cells.append(f"{r['speed_vs_trl']:.2f}" if "speed_vs_trl" in r else "-")
        cells.append(f"{r['memory_vs_trl']:.2f}" if "memory_vs_trl" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _yes_no(value) -> str:
    return "-" if value is None else ("on" if value else "off")


def versions() -> dict[str, str | None]:
    """Versions of python and of every package a side may use (None: not installed)."""
    from mftune.train.tracking import package_versions

    packages = ("mftune", "torch", "transformers", "peft", "accelerate", "trl", "datasets")
    optional = ("liger-kernel", "flash-attn", "bitsandbytes")
    return {"python": platform.python_version()} | package_versions(packages + optional)


MFU_FORMULA = (
    "MFU = tok/s x FLOPs per token / peak. FLOPs per token = 6N (full) or 4N + 6N_adapter (LoRA, QLoRA), "
    "N = every parameter but the input embedding (the output head counted even when tied), plus attention "
    "6·L·d·(Σs²/Σs) over the data set's sample lengths s (causal QKᵀ and AV, forward and backward); "
    "recomputation (checkpointing) and dequantisation are not counted."
)


def run(args: argparse.Namespace, profile: Profile, workdir: Path) -> int:
    """Data, then shape by shape: build the model, run its cases; the JSON is rewritten after each case.

    Returns:
        The exit status: 1 if a case failed other than by running out of memory or of time, else 0.
    """
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v))
    corpus = build_corpus(workdir, profile, args.seed)
    print(
        f"data: {corpus['samples']} samples, {corpus['tokens']:,} tokens, median {corpus['median_len']:.0f}, "
        f"mean {corpus['mean_len']:.0f}, max {corpus['max_len']} tokens ({corpus['dropped_overlong']} over "
        f"{profile.max_len} dropped), {corpus['trained_share']:.0%} trained (assistant turns); "
        f"{profile.rows_per_step} rows of {profile.max_len} per step ({profile.tokens_per_step:,} tokens), "
        f"{profile.warmup_steps} warm-up + {profile.steps} timed steps",
        flush=True,
    )
    runner = Runner(workdir, profile, args, deadline=args.started + (args.time_budget or math.inf))
    cases, flops = plan_cases(args), {}
    report = {
        "command": shlex.join(sys.argv),
        "device": None,
        "versions": versions(),
        "profile": asdict(profile),
        "peak_tflops": args.peak_tflops,
        "time_budget": args.time_budget,
        "mfu_formula": MFU_FORMULA,
        "data": corpus,
        "models": {},
        "results": runner.results,
    }
    for shape_name in dict.fromkeys(c.shape for c in cases):
        counts = report["models"][shape_name] = model_counts(SHAPES[shape_name])
        for method in METHODS:
            flops[shape_name, method] = flops_per_token(counts, method, corpus["attention_len"])
        shape_cases = [c for c in cases if c.shape == shape_name]
        built = None if runner.out_of_time(shape_cases[0]) else runner.model(shape_name, SHAPES[shape_name])
        if built is None:
            print(f"model {shape_name}: not built, the time budget has run out", flush=True)
        else:
            model_dir, report["device"] = built
            print(f"model {shape_name}: {counts['total'] / 1e9:.2f}B parameters on {built[1]}", flush=True)
        for case in shape_cases:
            if built:
                result = runner.run(case, model_dir)
            else:
                result = {
                    **asdict(case),
                    "status": "skipped",
                    "error": "time budget: no time to build the model",
                }
            runner.results.append(result)
            done = f"{result['tps']:,.0f} tok/s" if result["status"] == "ok" else result["status"]
            print(f"  {case.name}: {done} ({result.get('wall_seconds', 0)} s)", flush=True)
            add_mfu_and_ratios(runner.results, flops, args.peak_tflops)
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # a long run keeps what it measured
        shutil.rmtree(runner.workdir / "models" / shape_name, ignore_errors=True)
    print(f"\ndevice: {report['device']}; peak {args.peak_tflops:g} TFLOP/s\n")
    print(table(runner.results))
    print(f"\ntok/s: real (non-padding) input tokens per second over the timed steps. {MFU_FORMULA}")
    print(f"results: {args.out}")
    return int(any(r["status"] not in NOT_FAILURES for r in runner.results))


def profile_from(args: argparse.Namespace) -> Profile:
    """The run's sizes: the flags, with --smoke's CPU-sized defaults for those not given."""
    smoke = {"steps": 2, "warmup_steps": 1, "tokens_per_step": 1024, "max_len": 256, "median_len": 64}
    gpu = {"steps": 20, "warmup_steps": 3, "tokens_per_step": 32768, "max_len": 4096, "median_len": 350}
    sizes = {
        k: getattr(args, k) if getattr(args, k) is not None else v
        for k, v in (smoke if args.smoke else gpu).items()
    }
    device, dtype = ("cpu", "float32") if args.smoke else ("cuda", "bfloat16")
    return Profile(**sizes, device=device, dtype=dtype)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=GPU_SHAPES, default=list(GPU_SHAPES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all (smoke: full lora)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, help="default: all (smoke: trl if installed)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--steps", type=int, help="timed optimizer steps per case (default 20; smoke 2)")
    parser.add_argument("--warmup-steps", type=int, help="untimed optimizer steps first (default 3; smoke 1)")
    parser.add_argument(
        "--probe-steps", type=int, default=3, help="timed steps of each micro-batch tried by a fastest search"
    )
    parser.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step (default 32768)")
    parser.add_argument("--max-len", type=int, help="packed row and longest sample, in tokens (default 4096)")
    parser.add_argument("--median-len", type=int, help="median sample length in tokens (default 350)")
    parser.add_argument(
        "--micro-batches",
        nargs="+",
        type=int,
        help="micro-batch sizes (rows) a fastest setting tries; default: the rows of a step, halved down to 1",
    )
    parser.add_argument(
        "--fastest-micro",
        nargs="+",
        default=[],
        metavar="SIDE=N",
        help="a side's micro-batch size at its fastest setting, without a search (e.g. mftune=4 trl=1)",
    )
    parser.add_argument(
        "--mftune-attention", default="auto", help="mftune's model.attention in every case (default auto)"
    )
    parser.add_argument(
        "--trl-attention",
        default="auto",
        help="TRL's attn_implementation at its fastest; auto: flash_attention_2 if flash-attn is installed, "
        "else transformers' default (sdpa)",
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--out", type=Path, default=Path("throughput.json"), help="JSON results file")
    parser.add_argument(
        "--workdir", type=Path, help="models, data, runs and logs; default: a temporary folder"
    )
    parser.add_argument("--case-timeout", type=int, default=1800, help="seconds before a case is abandoned")
    parser.add_argument(
        "--time-budget",
        type=float,
        help="seconds for the whole run: a case that would not finish in the time left is skipped, one "
        "still running when it is spent is stopped; both are reported and do not fail the run",
    )
    parser.add_argument(
        "--case-estimate",
        type=float,
        help="seconds the first case of a shape is expected to take, under --time-budget (default 45; smoke 5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per case (OMP_NUM_THREADS); smoke default 1, robust to busy cores",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check of the script: a tiny model, float32, few steps; sides mftune, plain and trl if installed",
    )
    parser.add_argument("--run-case", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.started = time.monotonic()
    args.fastest_micro = _side_sizes(parser, args.fastest_micro)
    if args.case_estimate is None:
        args.case_estimate = 5.0 if args.smoke else 45.0
    if not args.smoke:
        args.methods, args.sides = args.methods or list(METHODS), args.sides or list(SIDES)
        return args
    if args.methods and "qlora" in args.methods and not util.find_spec("bitsandbytes"):
        parser.error("--smoke with qlora needs bitsandbytes (>= 0.47 runs on the CPU)")
    args.shapes, args.methods = ["tiny"], args.methods or ["full", "lora"]
    args.sides = args.sides or [s for s in SIDES if s != "trl" or util.find_spec("trl")]
    args.micro_batches = args.micro_batches or [2]
    args.threads = args.threads or 1
    return args


def _side_sizes(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, int]:
    """`["mftune=4", "trl=1"]` as `{"mftune": 4, "trl": 1}`; a malformed pair is a usage error."""
    sizes = {}
    for pair in pairs:
        side, _, size = pair.partition("=")
        if side not in SIDES or not size.isdigit() or int(size) < 1:
            parser.error(f"--fastest-micro {pair!r}: expected SIDE=N with SIDE one of {', '.join(SIDES)}")
        sizes[side] = int(size)
    return sizes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run_case:
        return run_case(args.run_case)
    if args.prepare_model:
        return prepare_model(args.prepare_model)
    profile = profile_from(args)
    if profile.tokens_per_step % profile.max_len or profile.steps < 1 or profile.warmup_steps < 1:
        raise SystemExit("--tokens-per-step must be a multiple of --max-len; --steps, --warmup-steps >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mftune-throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        status = run(args, profile, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
