"""What vLLM's LoRA support can take of a run's adapter: used by `mftune eval` and `mftune serve` alike."""

from __future__ import annotations

from pathlib import Path

from mftune.infer.load import adapter_config, is_adapter_dir

# vLLM accepts a fixed set of maximum LoRA ranks.
_VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def needs_merge(model_dir: Path) -> bool:
    """Whether an adapter folder trains whole modules (`modules_to_save`), which vLLM's LoRA cannot load."""
    return is_adapter_dir(model_dir) and bool(adapter_config(model_dir).get("modules_to_save"))


def max_lora_rank(model_dir: Path) -> int:
    """vLLM's `max_lora_rank` for an adapter folder: the smallest accepted value that holds its rank."""
    rank = int(adapter_config(model_dir).get("r", 16))
    return next((choice for choice in _VLLM_MAX_RANKS if rank <= choice), rank)
