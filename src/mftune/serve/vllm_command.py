"""The `vllm serve` command line that serves a run as it was trained.

vLLM is used as it is: mftune only says what to serve. A run's adapter becomes a LoRA module under the
served name (the base is listed as NAME-base); its chat template and its generation config (the
training stop token among the EOS ids) come from the run's folder, not the base model's, so the model
stops where it was trained to. An adapter that also trained whole modules (`modules_to_save`), which
vLLM's LoRA cannot load, is merged into a folder first. The API key goes through the environment
(VLLM_API_KEY), never the command line, where any user could read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mftune.infer.load import adapter_base, is_adapter_dir
from mftune.infer.vllm_lora import max_lora_rank


@dataclass(frozen=True)
class VllmLaunch:
    """A `vllm serve` invocation: its arguments and the environment it adds."""

    argv: list[str]
    env: dict[str, str]


def vllm_command(
    model_dir: Path,
    *,
    name: str,
    host: str,
    port: int,
    api_key: str | None,
    max_concurrency: int,
    merged_dir: Path | None = None,
) -> VllmLaunch:
    """The command that serves `model_dir` (a model or adapter folder) under `name`.

    Args:
        model_dir: A run's final/, or a model or adapter folder.
        name: The model name clients ask for.
        host, port: Where to listen.
        api_key: Required from clients when set.
        max_concurrency: Sequences vLLM schedules at once (`--max-num-seqs`).
        merged_dir: Where the adapter was merged, when it had to be (see `infer.vllm_lora.needs_merge`).
    """
    argv = ["vllm", "serve"]
    if is_adapter_dir(model_dir) and merged_dir is None:
        argv += [
            adapter_base(model_dir),
            "--served-model-name", f"{name}-base",
            "--enable-lora",
            "--lora-modules", f"{name}={model_dir}",
            "--max-lora-rank", str(max_lora_rank(model_dir)),
            "--tokenizer", str(model_dir),
        ]  # fmt: skip
    else:
        argv += [str(merged_dir or model_dir), "--served-model-name", name]
    source = merged_dir or model_dir
    template = source / "chat_template.jinja"
    if template.is_file():
        argv += ["--chat-template", str(template)]
    if (source / "generation_config.json").is_file():
        argv += ["--generation-config", str(source)]
    argv += ["--host", host, "--port", str(port), "--max-num-seqs", str(max_concurrency)]
    return VllmLaunch(argv, {"VLLM_API_KEY": api_key} if api_key else {})
