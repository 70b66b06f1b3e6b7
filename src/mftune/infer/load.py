"""Load a trained model folder (full model or adapter) for generation, and find where replies stop."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mftune.model.load import resolve_dtype

ADAPTER_CONFIG = "adapter_config.json"
_PROBE_REPLY = "mftune-probe-reply"


def resolve_model_dir(path: str | Path) -> Path:
    """The model folder `path` names: a run folder's `final/` when there is one, else `path` itself.

    Raises:
        FileNotFoundError: `path` is not a folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    return path / "final" if (path / "final").is_dir() else path


def is_adapter_dir(model_dir: Path) -> bool:
    """Whether `model_dir` holds a peft adapter rather than a full model."""
    return (model_dir / ADAPTER_CONFIG).is_file()


def adapter_config(model_dir: Path) -> dict:
    """An adapter folder's `adapter_config.json`, as a dict."""
    return json.loads((model_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def adapter_base(model_dir: Path) -> str:
    """The base model an adapter folder was trained on (its `base_model_name_or_path`).

    Raises:
        ValueError: The adapter config names no base.
    """
    base = adapter_config(model_dir).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{model_dir / ADAPTER_CONFIG} names no base model; pass the base explicitly")
    return base


def load_for_inference(
    model_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype = "auto",
    base: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a trained model and its tokenizer in eval mode.

    Args:
        model_dir: A full model folder, an adapter folder (its base is loaded and the adapter applied,
            not merged), or a run folder holding either as `final/`.
        device: Where to run; default CUDA when available, else CPU.
        dtype: A torch dtype or a `model.dtype` name (`auto`: see `resolve_dtype`).
        base: Base model to put an adapter on, instead of the one its config names.
        trust_remote_code: Run code shipped with the checkpoint.

    Returns:
        `(model, tokenizer)`; the tokenizer comes from `model_dir` (carrying the training chat
        template), or from the base when the folder has none.

    Raises:
        FileNotFoundError: `model_dir` is not a folder.
        ValueError: `base` is given for a full model, or an adapter names no base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(model_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    if is_adapter_dir(model_dir):
        base = base or adapter_base(model_dir)
    elif base is not None:
        raise ValueError(f"{model_dir} holds a full model; a base only applies to an adapter folder")
    model = AutoModelForCausalLM.from_pretrained(
        base or model_dir, dtype=dtype, device_map=device, trust_remote_code=trust_remote_code
    )
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_dir)
    has_tokenizer = (model_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(
        model_dir if has_tokenizer else base, trust_remote_code=trust_remote_code
    )
    return model.eval(), tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the generation config's EOS ids, the tokenizer's EOS, and the
    special token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>` ...)."""
    return reply_stop_ids(model.generation_config.eos_token_id, tokenizer)


def reply_stop_ids(eos: int | list[int] | None, tokenizer) -> list[int]:
    """`stop_token_ids` from a generation config's `eos_token_id` alone, without a loaded model."""
    ids = list(eos) if isinstance(eos, list) else [eos]
    ids += [tokenizer.eos_token_id, turn_closing_id(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def turn_closing_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant reply (it closes the turn)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError:  # a template that refuses the probe conversation
        return None
    tail = text[text.rfind(_PROBE_REPLY) + len(_PROBE_REPLY) :]
    special = set(tokenizer.all_special_ids)
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return next((i for i in tail_ids if i in special), None)
