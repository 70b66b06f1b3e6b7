"""Generation with a trained model: load a model or adapter folder, batch-generate, chat."""

from mftune.infer.chat import chat_loop, run_chat
from mftune.infer.generate import generate_batch, generate_file, read_requests, render_prompts
from mftune.infer.load import load_for_inference, resolve_model_dir, stop_token_ids

__all__ = [
    "chat_loop",
    "generate_batch",
    "generate_file",
    "load_for_inference",
    "read_requests",
    "render_prompts",
    "resolve_model_dir",
    "run_chat",
    "stop_token_ids",
]
