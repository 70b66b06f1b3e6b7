"""The `eval` section: which tasks `mftune eval` (and the end of `mftune train`) scores, and how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mftune.config.errors import field_error
from mftune.config.section import Section

Metric = Literal["exact_match", "pass_at_k"]


class PromptConfig(Section):
    """How a problem becomes a prompt, and how code is taken from a reply."""

    style: Literal["auto", "chat", "completion"] = Field(
        "auto",
        description="chat: the problem as a user turn through the model's chat template; completion: the problem's raw prompt text, continued (base models, HumanEval's original setting). auto: chat when the tokenizer has a chat template.",
    )
    instruction: str | None = Field(
        None,
        description="The user turn of a code problem in chat style, with {prompt} (HumanEval's prompt; MBPP's text) and {tests} (MBPP's asserts); null: mftune's default per record kind (docs/evaluation.md).",
    )
    system: str | None = Field(None, description="A system turn put before every chat-style prompt.")
    extract: Literal["auto", "fenced", "none"] = Field(
        "auto",
        description="Code taken from a chat reply. fenced: the first ``` block (nothing when there is none); none: the whole reply; auto: the first block when there is one, else the whole reply.",
    )
    stop: list[str] | None = Field(
        None,
        description="Strings that end a completion-style generation (cut there); null: HumanEval's (\\ndef, \\nclass, \\nif __name__, \\nprint() for code problems, none for others.",
    )


class ExactMatchConfig(Section):
    """Exact match: the greedy reply against the record's `answer`, both stripped of surrounding whitespace."""

    case_sensitive: bool = Field(True, description="false: compare case-folded.")
    collapse_whitespace: bool = Field(False, description="true: every run of whitespace counts as one space.")


class PassAtKConfig(Section):
    """pass@k: n programs per problem run against its tests, scored with the unbiased estimator."""

    n: int = Field(1, ge=1, description="Samples generated per problem.")
    k: list[int] = Field([1], min_length=1, description="The k of every pass@k reported; each ≤ n.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0: greedy (then n must be 1).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold (when sampling).")

    @model_validator(mode="after")
    def _check_k(self) -> PassAtKConfig:
        too_large = [k for k in self.k if k > self.n]
        if too_large or min(self.k) < 1:
            raise field_error("k", f"every k must be in [1, n = {self.n}], got {self.k}")
        if self.n > 1 and self.temperature == 0:
            raise field_error("n", f"{self.n} greedy samples would all be the same: set a temperature > 0")
        return self


class EvalTaskConfig(Section):
    """One task to evaluate: records from a file or folder, or a built-in benchmark."""

    path: str | None = Field(
        None,
        description="A .jsonl/.json file or a folder of them, relative to the config file: records with an answer (exact match) or tests (pass@k).",
    )
    benchmark: Literal["humaneval"] | None = Field(
        None, description="A built-in benchmark instead of a path (HumanEval needs mftune[eval])."
    )
    metrics: list[Metric] | None = Field(
        None,
        description="exact_match, pass_at_k; null: exact_match for records with an answer, pass_at_k for records with tests.",
    )
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Prompt construction.")
    exact_match: ExactMatchConfig = Field(default_factory=ExactMatchConfig, description="Exact-match rules.")
    pass_at_k: PassAtKConfig = Field(default_factory=PassAtKConfig, description="Sampling for pass@k.")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest reply; null: eval.max_new_tokens.")
    limit: int | None = Field(None, ge=1, description="Only the first this many records (quick checks).")

    @model_validator(mode="after")
    def _check_source(self) -> EvalTaskConfig:
        if (self.path is None) == (self.benchmark is None):
            raise field_error("path", "set path or benchmark, exactly one of them")
        return self


class SandboxConfig(Section):
    """Limits of each generated program's process (docs/evaluation.md says what they do and do not stop)."""

    timeout: float = Field(
        10.0, gt=0, description="Wall-clock seconds before the program's processes are killed."
    )
    cpu_seconds: int = Field(10, ge=1, description="CPU seconds per process (RLIMIT_CPU).")
    memory_mb: int = Field(1024, ge=64, description="Address space per process, in MiB (RLIMIT_AS).")
    file_size_mb: int = Field(
        16, ge=1, description="Largest file a program may write, in MiB (RLIMIT_FSIZE)."
    )
    max_processes: int = Field(
        16,
        ge=1,
        description="Processes a program may start besides those its user already runs (RLIMIT_NPROC).",
    )
    network: Literal["auto", "isolated", "allowed"] = Field(
        "auto",
        description="auto: a private network namespace where the machine allows one; isolated: refuse to run without one; allowed: no namespace.",
    )
    workers: int = Field(2, ge=1, description="Programs run at once.")


class EvalConfig(Section):
    """Per-task evaluation: `mftune eval`, and `mftune train` at its end when tasks are set."""

    tasks: dict[str, EvalTaskConfig] = Field(
        {}, description="Tasks whose generations are scored, by name (a training task's name joins its row)."
    )
    loss: bool = Field(
        True,
        description="Also report loss, token accuracy and perplexity on every training task's validation split (when the run's config is known).",
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="Generation engine; vllm needs vLLM installed and a GPU."
    )
    batch_size: int = Field(8, ge=1, description="Sequences generated at once.")
    max_new_tokens: int = Field(256, ge=1, description="Longest reply, in tokens.")
    seed: int = Field(0, description="Seed of sampling: a rerun on the same engine draws the same samples.")
    output_dir: str | None = Field(
        None,
        description="Where results go; null: TARGET/eval for `mftune eval`, output_dir/eval for training.",
    )
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="Program execution limits.")
