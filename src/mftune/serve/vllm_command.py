"""The `vllm serve` command line that serves a run as it was trained.

vLLM is used as it is: mftune only says what to serve. A run's adapter becomes a LoRA module under the
served name (the base is listed as NAME-base); its chat template and its generation config (the
training stop token among the EOS ids) come from the run's folder, not the base model's, so the model
stops where it was trained to. An adapter that also trained whole modules (`modules_to_save`), which
vLLM's LoRA cannot load, is merged into a folder first. The API key goes through the environment
(VLLM_API_KEY), never the command line, where any user could read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


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
        merged_dir: Where the adapter was merged, when it had to be (see `needs_merge`).
    """
    argv = ["vllm", "serve"]
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file() and merged_dir is None:
        config = json.loads(adapter.read_text(encoding="utf-8"))
        rank = int(config.get("r", 16))
        argv += [
            config["base_model_name_or_path"],
            "--served-model-name", f"{name}-base",
            "--enable-lora",
            "--lora-modules", f"{name}={model_dir}",
            "--max-lora-rank", str(_lora_rank_choice(rank)),
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


def needs_merge(model_dir: Path) -> bool:
    """Whether an adapter folder trains whole modules, which vLLM's LoRA cannot load."""
    adapter = model_dir / "adapter_config.json"
    if not adapter.is_file():
        return False
    return bool(json.loads(adapter.read_text(encoding="utf-8")).get("modules_to_save"))


def _lora_rank_choice(rank: int) -> int:
    # vLLM accepts a fixed set of maximum ranks; the smallest that holds the adapter's.
    for choice in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= choice:
            return choice
    return rank
