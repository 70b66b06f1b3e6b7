"""Fold a LoRA/DoRA adapter into its base model and save a standalone model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from mftune.infer.load import (
    ADAPTER_CONFIG,
    adapter_base,
    is_adapter_dir,
    load_for_inference,
    resolve_model_dir,
    stop_token_ids,
)
from mftune.model.load import DTYPES


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "2GB",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Merge an adapter into its base and write sharded safetensors, tokenizer and generation config.

    The base is loaded unquantised from its own folder, so a QLoRA adapter is merged into the
    full-precision weights its 4-bit base was quantised from (bf16 for most checkpoints), never
    into dequantised 4-bit weights; a base checkpoint that is itself quantised is refused.
    Merging runs on the CPU. The tokenizer is the adapter folder's, carrying the training chat
    template, and the generation config stops at the template's turn-closing token as well as EOS.

    Args:
        adapter_dir: An adapter folder (`adapter_config.json` + `adapter_model.safetensors`), or a
            run folder holding one as `final/`.
        out_dir: Folder to write (created if missing).
        base: Base model to merge into, instead of the adapter config's `base_model_name_or_path`.
        dtype: `auto` (the base checkpoint's own dtype), `float32`, `bfloat16` or `float16`.
        max_shard_size: Largest weight file, e.g. `"2GB"`.
        trust_remote_code: Run code shipped with the base checkpoint.
        overwrite: Write into an `out_dir` that is not empty (never into the adapter's own folder).

    Returns:
        `out_dir` as a `Path`.

    Raises:
        FileNotFoundError: The folder holds no adapter (a full model needs no merge).
        ValueError: Unknown dtype, the adapter names no base and none is given, the base is a
            quantised checkpoint, `out_dir` is the adapter's folder or inside it, or `out_dir` is not
            empty and `overwrite` is not set.
    """
    from transformers import AutoConfig

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    source = resolve_model_dir(adapter_dir)
    if not is_adapter_dir(source):
        raise FileNotFoundError(
            f"{source} has no {ADAPTER_CONFIG}: it is not an adapter folder (a full model needs no merge)"
        )
    _check_output(Path(source), Path(out_dir), overwrite)
    base = base or adapter_base(source)
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        # It would load quantised, and peft would fold the adapter into dequantised, re-quantised weights.
        raise ValueError(
            f"{base} is a quantised checkpoint; merge into the unquantised model it was made from (--base)"
        )
    torch_dtype = _checkpoint_dtype(config) if dtype == "auto" else DTYPES[dtype]
    model, tokenizer = load_for_inference(
        source, device="cpu", dtype=torch_dtype, base=base, trust_remote_code=trust_remote_code
    )
    merged = model.merge_and_unload()
    merged.generation_config.eos_token_id = stop_token_ids(merged, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _check_output(source: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse to write into the adapter's own folder (or below it), or into a folder with files in it."""
    source, target = source.resolve(), out_dir.resolve()
    if target == source or source in target.parents:
        raise ValueError(f"--out {out_dir} is the adapter's own folder {source}: choose another one")
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not overwrite):
        raise ValueError(f"--out {out_dir} is not empty: choose an empty or new folder, or pass --overwrite")
