"""What runs inside one throughput case's subprocess: each side's training run, and the model builder.

Each side trains the same saved model on the same samples and returns per-step tokens and seconds, its
peak GPU memory and what it really trained with (`describe_model`):

- `run_mftune`: `mftune train` in-process (`load_config` + `train`), its numbers from metrics.jsonl;
- `run_trl`: TRL's `SFTTrainer` on mftune's token ids and labels, packed (best-fit decreasing, padding-free);
- `run_plain`: a plain transformers + peft loop over padded batches with the model's own loss.

    python benchmarks/throughput_sides.py case SPEC.json     # run by benchmarks/throughput.py
    python benchmarks/throughput_sides.py model SPEC.json
"""

from __future__ import annotations

import contextlib
import itertools
import json
import platform
import sys
import time
from collections.abc import Iterator
from importlib import util
from pathlib import Path

import numpy as np
from workload import LEARNING_RATE, LORA_ALPHA, LORA_RANK, Profile, load_samples, mftune_config, mftune_steps


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


def main(argv: list[str] | None = None) -> None:
    kind, spec = argv if argv is not None else sys.argv[1:]
    {"case": run_case, "model": prepare_model}[kind](Path(spec))


if __name__ == "__main__":
    main()
