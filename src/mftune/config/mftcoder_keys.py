"""Every key of an MFTCoder train config (`mftcoder_accelerate`, `MftTrainArgs`): what MFTCoder's code does
with it, the mftune key it becomes, and how mftune differs, with the reason.

This table is the whole mapping's documentation: `docs/mftcoder-compat.md` is generated from it, and
`mftune.config.mftcoder` translates by it (keys with a converter there, the others renamed as listed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Key:
    """One MFTCoder key.

    Attributes:
        target: the mftune key it sets ("" when it has no effect in mftune).
        mftcoder: what MFTCoder's code does with it.
        difference: how mftune differs, and why ("" when it trains the same).
        values: renamed choices; empty when the value is kept as it is.
    """

    target: str
    mftcoder: str
    difference: str = ""
    values: Mapping[Any, Any] = field(default_factory=dict)


_NO_EFFECT = "a legacy option MFTCoder's code no longer reads"

MFTCODER_KEYS: dict[str, Key] = {
    # --- data
    "data_paths": Key(
        "data.tasks",
        'task folders, a list or a bracketed string "[a,b]"; reads the *.jsonl files directly in each; '
        "a task is named after its folder",
        "mftune also reads .json and .parquet files, and searches folders recursively",
    ),
    "data_weights": Key(
        "",
        "read, then overwritten with ones: tasks are sampled by their size",
        "ignored as MFTCoder's code ignores it; to weight the sampling set data.tasks.<name>.sampling_weight",
    ),
    "task_weights": Key(
        "data.tasks.<name>.loss_weight",
        "one loss weight per task, used by case3, case4 (not by coba)",
    ),
    "tokenize_mode": Key(
        "data.train_on",
        "sft: only assistant turns trained; pretrain: role markers emptied and every token trained; "
        "sst: offline pre-tokenized data only",
        "sst reads every task as raw text",
    ),
    "data_split": Key(
        "data.valid_ratio",
        '"train,valid,test" percentages, applied to the rows after packing; the test share is dropped',
        "mftune splits each task's samples (before packing); the test share becomes data.test_ratio, "
        "held out and never trained",
    ),
    "seq_length": Key(
        "data.max_seq_len",
        "keeps samples of up to seq_length + 1 tokens (inputs and labels are the row shifted by one)",
        "data.max_seq_len is seq_length + 1, which keeps the same samples",
    ),
    "padding_mode": Key(
        "data.packing",
        "padding: one sample per row; pack: whole samples in file order, a new row when the next does "
        "not fit; concat: the stream cut into windows of seq_length + 1 tokens, seq_length apart; "
        "packed samples attend to each other",
        "rows are packed from each epoch's shuffled sample order, tasks mixed, not per file; MFTCoder "
        "drops the last, partial row of pack and concat, mftune keeps it",
        values={"padding": "none", "pack": "sequential", "concat": "contiguous"},
    ),
    "role_markers": Key(
        "data.template.role_markers",
        "the system, user and assistant markers (default <s>system\\n, <s>human\\n, <s>bot\\n)",
    ),
    "load_raw_dataset": Key(
        "",
        "true: read jsonl; false: read pre-tokenized binary files",
        "data is always read from the task files, then cached tokenized; binary files are not read",
    ),
    "use_dynamic_padding": Key("", "rows padded to the longest in the batch", "always so in mftune"),
    "shuffle_before_split": Key("", "shuffle before the train/valid split", "always so, seeded by data.seed"),
    "use_random_sampler": Key("", "shuffle the training rows", "always so, seeded by data.seed"),
    # --- model
    "pretrained_model_path": Key(
        "model.name_or_path", "the base model's folder, relative to the working folder (as every path)"
    ),
    "model_type": Key(
        "",
        "picks the model class and its special tokens",
        "the architecture is read from the model's config.json, the special tokens from its tokenizer",
    ),
    "tokenizer_type": Key("", "AutoTokenizer", "always AutoTokenizer"),
    "vocab_file": Key("", "the tokenizer folder", "the tokenizer comes from model.tokenizer or the model"),
    "trust_remote_code": Key(
        "model.trust_remote_code",
        "a legacy key: MFTCoder passes trust_remote_code=True whatever it says",
        "mftune runs a checkpoint's own code only when the config sets this true",
    ),
    "attn_implementation": Key(
        "model.attention",
        "passed to transformers; flash_attention_2 needs the flash-attn package",
        "flash_attention_2 becomes auto: varlen flash kernels (torch's, or flash-attn's when installed) "
        "for isolated packing on GPUs, sdpa elsewhere; the same attention, without requiring flash-attn",
        values={"flash_attention_2": "auto", "sdpa": "sdpa", "eager": "eager"},
    ),
    "gradient_checkpointing": Key(
        "model.gradient_checkpointing",
        "not an MFTCoder key: it always checkpoints",
        values={True: "on", False: "off"},
    ),
    "bf16": Key("model.dtype", "not an MFTCoder key: it always trains in bfloat16", "true: bfloat16"),
    "fp16": Key("model.dtype", "not an MFTCoder key", "true: float16"),
    "low_cpu_mem_usage": Key("", "passed to from_pretrained", "model loading is managed by mftune"),
    # --- fine-tuning method
    "peft_type": Key(
        "finetune.method",
        "lora, qlora, or null for full fine-tuning; absent: qlora (its default); LoRA adapters train "
        "the biases of adapted layers (bias lora_only)",
        "finetune.lora.bias is lora_only too",
    ),
    "quantization": Key(
        "",
        "overwritten: 4bit under peft_type qlora, none otherwise",
        "ignored as MFTCoder's code ignores it: qlora is 4-bit NF4 with double quantisation",
    ),
    "lora_rank": Key("finetune.lora.r", "adapter rank (default 96)"),
    "lora_alpha": Key("finetune.lora.alpha", "adapter scaling numerator (default 32)"),
    "lora_dropout": Key("finetune.lora.dropout", "adapter dropout (default 0.05)"),
    "target_modules": Key(
        "finetune.lora.target_modules",
        "module names; null: a per-model_type list",
        "a string is read as comma-separated names; null: every linear layer but the output head",
    ),
    # --- optimisation
    "weighted_loss_mode": Key(
        "train.loss",
        "case1 (token), case2 (sample), case3 (task), case4 (task_sample), coba, selfpaced; normalised "
        "per micro-batch and device",
        "the same, with train.loss_scope: micro_batch (mftune's own default normalises over the whole "
        "step, DESIGN.md §3); selfpaced is not offered",
    ),
    "per_device_train_batch_size": Key("train.micro_batch_size", "rows per forward pass per device"),
    "gradient_accumulation_steps": Key(
        "train.global_batch_size",
        "micro-batches per optimizer step",
        "train.global_batch_size = per_device_train_batch_size × gradient_accumulation_steps, for one "
        "process: multiply it by the number of processes to keep MFTCoder's batch",
    ),
    "per_device_eval_batch_size": Key(
        "",
        "rows per validation forward pass (also CoBa's probe batch)",
        "evaluation uses train.micro_batch_size; CoBa's probe size follows coba_sample_valid_num",
    ),
    "learning_rate": Key("train.learning_rate", "peak learning rate of AdamW (betas 0.9, 0.999)"),
    "min_lr": Key(
        "train.min_lr",
        "after every scheduler step a rate below min_lr is reset to it, in warm-up too",
        "train.min_lr_mode is floor, the same rule; MFTCoder's first step runs at the scheduler's "
        "initial rate (0 during warm-up), mftune's at min_lr",
    ),
    "weight_decay": Key(
        "train.weight_decay",
        "AdamW weight decay on every parameter",
        "mftune does not decay biases and norm scales",
    ),
    "lr_scheduler_type": Key(
        "train.lr_schedule",
        "transformers' get_scheduler; its warm-up and length are counted in micro-batches "
        "(× gradient_accumulation_steps) while it steps once per optimizer step",
        "the schedule is counted in optimizer steps, so with accumulation MFTCoder's cosine barely "
        "decays and mftune's reaches its end; cosine_with_restarts (one cycle) equals cosine",
        values={
            "cosine": "cosine",
            "cosine_with_restarts": "cosine",
            "linear": "linear",
            "constant": "constant",
            "constant_with_warmup": "constant",
        },
    ),
    "num_warmup_steps": Key(
        "train.warmup_steps", "warm-up steps; a number below 1 is a fraction of all steps"
    ),
    "num_train_epochs": Key("train.epochs", "passes over the training rows"),
    "max_train_steps": Key("train.max_steps", "optimizer steps; null: from num_train_epochs"),
    "seed": Key("train.seed", "the seed of everything", "also data.seed"),
    # --- evaluation, checkpoints, logging
    "evaluation_steps": Key("train.eval_every", "steps between validations"),
    "eval_steps": Key("train.eval_every", "not an MFTCoder train key (its DPO config's)"),
    "checkpointing_steps": Key("train.save_every", "steps between checkpoints"),
    "log_interval": Key("train.log_every", "steps between log lines"),
    "saving_limit": Key(
        "train.keep_last",
        "checkpoints kept, the best by validation loss always among them; null: all of them under "
        "LoRA and QLoRA, 2 under full fine-tuning",
        "mftune keeps the newest saving_limit and the best one besides",
    ),
    "epoch_checkpointing": Key(
        "",
        "also checkpoint at the end of every epoch",
        "checkpoints every train.save_every steps and at the end",
    ),
    "early_stopping": Key(
        "train.early_stopping.patience",
        "stop after early_stopping_stall_num validations without a lower loss",
    ),
    "early_stopping_stall_num": Key("train.early_stopping.patience", "see early_stopping (default 5)"),
    "output_dir": Key("train.output_dir", "where checkpoints go"),
    "tb_dir": Key("", "TensorBoard logs", "written under train.output_dir"),
    "resume_from_checkpoint": Key(
        "train.resume",
        "a step_N checkpoint to continue from (for adapters, an adapter folder)",
        "an mftune checkpoint resumes exactly; an MFTCoder adapter folder is a warm start of the "
        "adapter weights, with a fresh optimizer, schedule and data order (MFTCoder saves none of them)",
    ),
    "auto_resume": Key("train.resume", "continue from the latest checkpoint", "true: auto, false: never"),
    "verbose": Key("", "log verbosity", "not part of the run config"),
    # --- CoBa
    "coba_warmup_steps": Key("coba.warmup", "steps with uniform weights"),
    "coba_history_length": Key("coba.history", "probes in the slope window"),
    "coba_tau": Key("coba.tau", "temperature of the divergence factor"),
    "coba_update_interval": Key(
        "coba.update_interval",
        "steps between probes (default 1)",
        "mftune's window slides with any interval; MFTCoder's only with 1",
    ),
    "coba_sample_valid_num": Key(
        "coba.probe_batches",
        "validation batches (of per_device_eval_batch_size rows, tasks mixed) drawn afresh at each probe, "
        "cycling through the validation set",
        "a fixed probe of coba_sample_valid_num × per_device_eval_batch_size rows of every task, the "
        "same at each probe: slopes of the same data are less noisy",
    ),
    "selfpaced_history_length": Key("", "settings of the selfpaced loss", "mftune has no selfpaced loss"),
    "selfpaced_interval": Key("", "settings of the selfpaced loss", "mftune has no selfpaced loss"),
    "selfpaced_sample_valid_num": Key("", "settings of the selfpaced loss", "mftune has no selfpaced loss"),
    "selfpaced_scale_factor": Key("", "settings of the selfpaced loss", "mftune has no selfpaced loss"),
    # --- distribution: chosen by the launcher
    "distributed_type": Key("", "deepspeed or fsdp", "chosen by the accelerate config you launch with"),
    "world_size": Key("", "processes", "the number of processes comes from the launcher"),
    "init_timeout_seconds": Key("", "process-group timeout", "managed by accelerate"),
    "use_xformers": Key("", _NO_EFFECT),
    "weight_by_num_documents": Key("", _NO_EFFECT),
    "make_vocab_size_divisible_by": Key("", _NO_EFFECT),
    "model_parallel_size": Key("", _NO_EFFECT),
    "use_slow_tokenizer": Key("", _NO_EFFECT),
}

# Keys only MFTCoder's preference-training configs (its xxpo entry point: DPO, ORPO) have.
PREFERENCE_KEYS = ("xxpo", "beta", "rpo_alpha", "max_prompt_length")


def reference_markdown() -> str:
    """The key-by-key table of `docs/mftcoder-compat.md`."""
    rows = ["| MFTCoder key | in MFTCoder's code | mftune key | difference |", "|---|---|---|---|"]
    for key, spec in MFTCODER_KEYS.items():
        target = f"`{spec.target}`" if spec.target else "no effect"
        difference = spec.difference
        if spec.values:
            choices = ", ".join(f"`{_literal(k)}` → `{v}`" for k, v in spec.values.items())
            difference = f"{choices}; {difference}" if difference else choices
        cells = [f"`{key}`", spec.mftcoder, target, difference or "the same"]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def _literal(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
