"""The config schema: every section of a run's configuration, with each field documented.

All sections forbid unknown keys and spell choices as closed `Literal`s. Loading, overrides and
error reporting live in `mftune.config`, which re-exports these classes.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mftune.config.errors import field_error
from mftune.config.eval_schema import EvalConfig
from mftune.config.section import Section as _Section

# MFTCoder's loss mode names, accepted for `train.loss`. The only place they are mapped.
LOSS_ALIASES: dict[str, str] = {"case1": "token", "case2": "sample", "case3": "task", "case4": "task_sample"}

_TASK_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class ModelConfig(_Section):
    """The base model."""

    name_or_path: str = Field(
        min_length=1,
        description="Hub name or local folder of the causal LM (local folders are relative to the config file).",
    )
    tokenizer: str | None = Field(None, description="Tokenizer name or folder; null: the model's own.")
    trust_remote_code: bool = Field(
        False, description="Run model/tokenizer code shipped with the checkpoint."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight dtype. auto: bfloat16 on GPUs that have it, float16 (with loss scaling) on older GPUs, float32 on CPU.",
    )
    attention: Literal[
        "auto", "sdpa", "eager", "varlen", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = Field(
        "auto",
        description="Attention implementation. varlen: packed samples run as separate sequences through a variable-length kernel (torch's or flash-attn's on CUDA, else a slow reference kernel). auto: varlen for isolated packing on CUDA GPUs with such a kernel (float16/bfloat16, sm80+) unless the model soft-caps attention logits or has a sliding window shorter than data.max_seq_len, else sdpa (eager for models without sdpa, such as Gemma-2). Other names go to transformers.",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="Recompute activations in backward. auto: on for models over 1B parameters."
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `on`/`off` as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class LoraConfig(_Section):
    """LoRA adapter settings (also used by QLoRA and DoRA)."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (a list, or one comma-separated string), or all-linear: every linear layer except the output head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="Biases trained with the adapters: none, all, or lora_only (those of adapted layers; MFTCoder's choice).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. embed_tokens).",
    )
    adapter_dtype: Literal["float32", "model"] = Field(
        "float32",
        description="Adapter weights in float32 (peft's default: every adapted layer then computes its adapter path in float32) or in the model's dtype (bfloat16 on most GPUs: faster and smaller, but small updates round away as in any pure-bfloat16 training).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _check_targets(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all-linear":
            value = [name.strip() for name in value.split(",")]
            if not all(value):
                raise ValueError("must be 'all-linear', a list of module names or 'name1,name2'")
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list (use 'all-linear' for every linear layer)")
        return value


class QloraConfig(_Section):
    """Quantisation of the frozen base model for QLoRA (bitsandbytes)."""

    bits: Literal[4, 8] = Field(4, description="Bits per base weight.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (4-bit only).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")


class FinetuneConfig(_Section):
    """Which parameters are trained."""

    method: Literal["full", "lora", "qlora", "dora"] = Field(
        "lora", description="full: every weight; lora/dora: adapters; qlora: adapters on a quantised base."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings.")
    qlora: QloraConfig = Field(default_factory=QloraConfig, description="Quantisation settings for qlora.")


class TaskConfig(_Section):
    """One task: its data and how it is weighted."""

    path: str = Field(
        min_length=1,
        description="Folder (searched recursively) or file of records, relative to the config file.",
    )
    format: Literal["auto", "chat_rounds", "messages", "sharegpt", "alpaca", "text"] = Field(
        "auto", description="Record format; auto: detected per file."
    )
    sampling_weight: float | None = Field(
        None, ge=0, description="Explicit sampling weight; null: from data.sampling."
    )
    loss_weight: float = Field(1.0, gt=0, description="Task weight w_k in the task and task_sample losses.")
    valid_ratio: float | None = Field(
        None, ge=0, lt=1, description="Fraction held out for validation; null: data.valid_ratio."
    )
    valid_path: str | None = Field(
        None, description="Separate validation data (folder or file); replaces the split when set."
    )


class RoleMarkers(_Section):
    """Text inserted before each turn by the role_markers template."""

    system: str = Field("<s>system\n", description="Marker before a system turn.")
    user: str = Field("<s>human\n", description="Marker before a user turn.")
    assistant: str = Field("<s>bot\n", description="Marker before an assistant turn.")


class TemplateConfig(_Section):
    """How a conversation becomes text with trained spans."""

    kind: Literal["role_markers", "jinja", "tokenizer"] = Field(
        "role_markers",
        description="role_markers: marker + content per turn; jinja: a template file; tokenizer: the model's chat_template.",
    )
    role_markers: RoleMarkers = Field(
        default_factory=RoleMarkers, description="Markers for kind role_markers."
    )
    jinja_file: str | None = Field(
        None, description="Jinja template (relative to the config file); required for kind jinja."
    )
    stop_token: str | None = Field(
        None, description="Text closing each assistant turn, always trained; null: the tokenizer's EOS."
    )

    @model_validator(mode="after")
    def _jinja_needs_file(self) -> TemplateConfig:
        if self.kind == "jinja" and not self.jinja_file:
            raise field_error("jinja_file", "required when kind is 'jinja'")
        return self


class DataConfig(_Section):
    """Tasks, rendering, lengths, splits, mixture and packing."""

    tasks: dict[str, TaskConfig] = Field(
        min_length=1,
        description="Tasks keyed by name; a list of folders (or of {path, name}) is accepted, named after each folder.",
    )
    template: TemplateConfig = Field(default_factory=TemplateConfig, description="Chat template settings.")
    max_seq_len: int = Field(2048, ge=8, description="Longest sample (and packed row), in tokens.")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="What happens to samples longer than max_seq_len (counted per task)."
    )
    train_on: Literal["assistant", "last_turn", "all"] = Field(
        "assistant",
        description="Tokens trained: every assistant turn with its stop token; last_turn: only the last one (for templates that rewrite earlier turns, such as Qwen3's); all: the whole rendered text (MFTCoder's tokenize_mode pretrain).",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="Bad records: fail lists them all before training; skip drops and counts them."
    )
    packing: Literal["none", "isolated", "sequential", "contiguous"] = Field(
        "isolated",
        description="none: one padded sample per row (MFTCoder's padding); isolated: whole samples bin-packed, no attention across samples; sequential: whole samples in order, a new row when the next does not fit, attending to each other (MFTCoder's pack); contiguous: the token stream cut into windows overlapping by one token, attending to each other (MFTCoder's concat, for pre-training).",
    )
    packing_window: int = Field(10000, ge=1, description="Samples per best-fit-decreasing packing window.")
    valid_ratio: float = Field(
        0.05, ge=0, lt=1, description="Default fraction of each task held out for validation."
    )
    test_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of each task held out as a test split: never trained on nor validated (MFTCoder's data_split test share).",
    )
    max_valid_samples: int | None = Field(
        500, ge=1, description="Cap on validation samples per task; null: no cap."
    )
    sampling: Literal["proportional", "uniform", "temperature"] = Field(
        "proportional", description="Task sampling: by size, equal, or p_k ∝ n_k^(1/temperature)."
    )
    temperature: float = Field(2.0, gt=0, description="Temperature of the temperature sampling.")
    seed: int = Field(42, description="Seed of splits and shuffles (per task, derived from the task name).")
    cache_dir: str = Field(".mftune_cache", description="Tokenized data cache, relative to the config file.")
    num_proc: int = Field(2, ge=1, description="Processes used to tokenize.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _accept_task_list(cls, value: Any) -> Any:
        return tasks_as_dict(value)

    @field_validator("tasks")
    @classmethod
    def _check_task_names(cls, tasks: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        for name in tasks:
            if not name or not set(name) <= _TASK_NAME_CHARS:
                raise field_error(name, "task names may only use letters, digits, '_', '.' and '-'")
        weighted = [name for name, task in tasks.items() if task.sampling_weight is not None]
        if weighted and len(weighted) != len(tasks):
            missing = [name for name in tasks if name not in weighted]
            raise field_error(
                f"{missing[0]}.sampling_weight",
                f"set for {', '.join(weighted)} but not for {', '.join(missing)}: give every task one, or none",
            )
        return tasks


class EarlyStopping(_Section):
    """Stop when a validation metric stops improving."""

    metric: str = Field("valid/loss", description="Metric watched (a key of metrics.jsonl).")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    patience: int | None = Field(
        None, ge=1, description="Evaluations without improvement before stopping; null: never stop early."
    )


class TrainConfig(_Section):
    """Optimisation, schedule, evaluation, checkpoints and logging."""

    output_dir: str = Field(
        "runs/mftune", description="Where the run writes everything, relative to the config file."
    )
    seed: int = Field(42, description="Seed of model initialisation (adapters) and dropout.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training mixture.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    micro_batch_size: int = Field(
        1, ge=1, description="Rows (packed) or samples (packing none) per forward pass on one device."
    )
    global_batch_size: int = Field(
        8,
        ge=1,
        description="Rows or samples per optimizer step over all devices; accumulation = global / (micro × world size).",
    )
    loss: Literal["token", "sample", "task", "task_sample", "coba"] = Field(
        "task",
        description="How a step's loss weighs tokens: token (each token equally), sample (each sample), task (each task present, by loss_weight), task_sample, or coba (task weights from convergence balancing). MFTCoder's case1-case4 are aliases of the first four.",
    )
    loss_scope: Literal["step", "micro_batch"] = Field(
        "step",
        description="Where train.loss normalises: step (over the whole optimizer step, every micro-batch and process: the strategy means the same at any batch split) or micro_batch (within each micro-batch on each process, the step taking their mean: MFTCoder's loss_func_mft).",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(
        0.0,
        ge=0,
        description="Learning rate the schedule decays to (min_lr_mode decay) or the floor under it (floor).",
    )
    min_lr_mode: Literal["decay", "floor"] = Field(
        "decay",
        description="decay: the schedule decays from learning_rate to min_lr; floor: it decays to 0 with transformers' warm-up (step / warmup) and is clamped from below at min_lr, warm-up included (MFTCoder's schedule).",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Linear warmup as a fraction of all steps.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup, from learning_rate to min_lr."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on biases and norms).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    eval_every: int = Field(
        100, ge=1, description="Evaluate on every task's validation split every this many optimizer steps."
    )
    log_every: int = Field(10, ge=1, description="Log metrics every this many optimizer steps.")
    save_every: int = Field(
        500, ge=1, description="Checkpoint every this many optimizer steps (and at the end)."
    )
    keep_last: int | None = Field(2, ge=1, description="Newest checkpoints kept; null: every checkpoint.")
    keep_best: int = Field(
        1, ge=0, description="Best checkpoints (by early_stopping.metric) kept besides those."
    )
    early_stopping: EarlyStopping = Field(
        default_factory=EarlyStopping, description="Early stopping settings."
    )
    resume: Literal["auto", "never"] | str = Field(
        "auto",
        description="auto: continue from the newest complete checkpoint in output_dir; never: start fresh; a path: that checkpoint.",
    )
    tensorboard: bool = Field(True, description="Write TensorBoard logs (when tensorboard is installed).")
    plots: bool = Field(True, description="Render per-task loss and weight curves to PNG at the end.")
    eval_generate_every: int | None = Field(
        None,
        ge=1,
        description="Run the eval section's generation metrics (exact match, pass@k) every this many optimizer steps; null: only at the end.",
    )

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_alias(cls, value: Any) -> Any:
        return LOSS_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("resume", mode="before")
    @classmethod
    def _check_resume(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError("must be 'auto', 'never' or a checkpoint path")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise field_error(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of train.micro_batch_size ({self.micro_batch_size})",
            )
        if self.min_lr > self.learning_rate:
            raise field_error("min_lr", f"{self.min_lr} is above train.learning_rate ({self.learning_rate})")
        if self.warmup_steps and self.warmup_ratio:
            raise field_error("warmup_ratio", "set warmup_steps or warmup_ratio, not both")
        return self


class CobaConfig(_Section):
    """Convergence balancing: task weights from validation-loss slopes (train.loss coba)."""

    warmup: int = Field(100, ge=0, description="Optimizer steps with uniform task weights before balancing.")
    history: int = Field(200, ge=2, description="Probe evaluations in the sliding window of the slope fits.")
    tau: float = Field(5.0, gt=0, description="Temperature of the divergence factor.")
    update_interval: int = Field(10, ge=1, description="Optimizer steps between probe evaluations.")
    probe_batches: int = Field(
        1,
        ge=1,
        description="Validation rows per task in the fixed probe set (packed rows: each holds several samples).",
    )
    floor: float | None = Field(
        None, ge=0, lt=1, description="Smallest task weight; null: 1/(10K) for K tasks."
    )


class Config(_Section):
    """A whole run."""

    model: ModelConfig = Field(description="The base model.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="What is trained.")
    data: DataConfig = Field(description="Tasks and the data pipeline.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    coba: CobaConfig = Field(default_factory=CobaConfig, description="Convergence balancing.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Per-task evaluation.")


def tasks_as_dict(value: Any) -> Any:
    """Turn a task list (folders, or mappings with `path` and optional `name`) into tasks keyed by name.

    A task from a list is named after its folder (or file, without a data suffix). Anything that is
    not a list is returned unchanged for the schema to judge.

    Raises:
        ValueError: an entry has no path, or two tasks get the same name.
    """
    if not isinstance(value, list):
        return value
    tasks: dict[str, Any] = {}
    for entry in value:
        if isinstance(entry, str):
            name, task = _task_name(entry), {"path": entry}
        elif isinstance(entry, dict) and isinstance(entry.get("path"), str):
            task = dict(entry)
            name = str(task.pop("name", None) or _task_name(task["path"]))
        else:
            raise ValueError(f"a task list holds folder paths or mappings with a 'path', got {entry!r}")
        if name in tasks:
            raise ValueError(f"two tasks are named {name!r}: {tasks[name]['path']} and {task['path']}")
        tasks[name] = task
    return tasks


def _task_name(path: str) -> str:
    name = os.path.basename(path.rstrip("/\\"))
    for suffix in _DATA_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name
