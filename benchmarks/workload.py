"""The throughput benchmarks' workload: model shapes, run sizes, the synthetic chat task, FLOPs, and
tokens/s read off a run.

- `SHAPES` (Qwen2.5's published sizes) and `Profile` (steps, tokens per step, row length, device);
- `build_corpus` writes a synthetic `messages` task, tokenizes it with mftune's own pipeline and saves
  its token ids and trained masks, so that the sides that are not mftune train on exactly those tokens;
- `model_counts` and `flops_per_token`: the model FLOPs behind MFU (docs/performance.md);
- `mftune_steps` and `summarise`: tokens and seconds per step from a run's metrics.jsonl, and tokens/s
  over the timed steps.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
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
LORA_RANK, LORA_ALPHA = 16, 32
LEARNING_RATE = 1e-5
MIN_LEN, LENGTH_SIGMA = 32, 0.9
# Role markers, stop token and newlines take 8 tokens; a turn's first word (no space before it) may split
# into 2-3 tokens. Lengths are aimed with this and then measured.
TEMPLATE_TOKENS = 12
DATA_MARGIN = 1.3  # tokens generated over what the steps need, so no side runs out within an epoch
TASK = "synthetic"
# Sizes of a throughput run: on a GPU, and under --smoke on a CPU.
GPU_SIZES = {"steps": 20, "warmup_steps": 3, "tokens_per_step": 32768, "max_len": 4096, "median_len": 350}
SMOKE_SIZES = {"steps": 2, "warmup_steps": 1, "tokens_per_step": 1024, "max_len": 256, "median_len": 64}


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


def profile_from(args) -> Profile:
    """A run's sizes: the flags that are set (`steps`, `warmup_steps`, `tokens_per_step`, `max_len`,
    `median_len`), the GPU's or --smoke's defaults for the others; float32 on the CPU under --smoke."""
    defaults = SMOKE_SIZES if args.smoke else GPU_SIZES
    sizes = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in defaults.items()}
    device, dtype = ("cpu", "float32") if args.smoke else ("cuda", "bfloat16")
    return Profile(**sizes, device=device, dtype=dtype)


# --- the synthetic task ----------------------------------------------------------------------------


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


# --- FLOPs ------------------------------------------------------------------------------------------


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


MFU_FORMULA = (
    "MFU = tok/s x FLOPs per token / peak. FLOPs per token = 6N (full) or 4N + 6N_adapter (LoRA, QLoRA), "
    "N = every parameter but the input embedding (the output head counted even when tied), plus attention "
    "6·L·d·(Σs²/Σs) over the data set's sample lengths s (causal QKᵀ and AV, forward and backward); "
    "recomputation (checkpointing) and dequantisation are not counted."
)


# --- what a run measured --------------------------------------------------------------------------


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
