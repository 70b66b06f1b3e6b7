"""Loading the model to fine-tune, wrapping it with adapters, and running it without logits for the loss."""

from mftune.model.adapters import apply_lora, lora_target_modules, resolve_target_modules
from mftune.model.hidden import hidden_states, output_head
from mftune.model.load import load_model, resolve_attention, resolve_dtype

__all__ = [
    "apply_lora",
    "hidden_states",
    "load_model",
    "lora_target_modules",
    "output_head",
    "resolve_attention",
    "resolve_dtype",
    "resolve_target_modules",
]
