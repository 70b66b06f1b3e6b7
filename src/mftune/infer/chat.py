"""An interactive multi-turn chat with a trained model, streamed token by token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from threading import Thread

import torch

from mftune.infer.generate import Messages, generation_kwargs, prompt_ids
from mftune.infer.load import load_for_inference

HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits"


def chat_loop(
    model_dir: str | Path,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    device: torch.device | str | None = None,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., None] = print,
) -> Messages:
    """Load `model_dir` and chat with it until `/exit` or end of input.

    Args:
        model_dir: A model, adapter or run folder (see `load_for_inference`).
        system: System message opening every conversation.
        max_new_tokens: Longest reply, in tokens.
        temperature: 0 for greedy decoding, else the sampling temperature.
        device: Where to run; default CUDA when available, else CPU.
        input_fn: Reads the user's next line (given a prompt string); injectable for tests.
        print_fn: Writes output, called like `print`; injectable for tests.

    Returns:
        The conversation as it stood at exit.
    """
    model, tokenizer = load_for_inference(model_dir, device=device)
    return run_chat(
        model,
        tokenizer,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        input_fn=input_fn,
        print_fn=print_fn,
    )


def run_chat(
    model,
    tokenizer,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., None] = print,
) -> Messages:
    """The chat loop of `chat_loop`, with a model already loaded."""
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    print_fn(f"chatting ({HELP})")
    while True:
        try:
            line = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print_fn()
            break
        if line == "/exit":
            break
        if line == "/reset":
            history = list(opening)
            print_fn("(conversation cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = _stream_reply(model, tokenizer, history, max_new_tokens, temperature, print_fn)
        history.append({"role": "assistant", "content": reply})
    return history


def _stream_reply(model, tokenizer, history, max_new_tokens, temperature, print_fn) -> str:
    """Generate the next reply on a thread, printing tokens as they arrive."""
    from transformers import TextIteratorStreamer

    ids = torch.tensor([prompt_ids(tokenizer, history)], device=model.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = generation_kwargs(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature)
    errors: list[BaseException] = []
    thread = Thread(target=_generate, args=(model, inputs, streamer, kwargs, errors))
    thread.start()
    print_fn("bot> ", end="", flush=True)
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        print_fn(piece, end="", flush=True)
    print_fn()
    thread.join()
    if errors:
        raise errors[0]
    return "".join(pieces).strip()


def _generate(model, inputs, streamer, kwargs, errors: list[BaseException]) -> None:
    try:
        # inference_mode is thread-local, so it is entered on the generating thread.
        with torch.inference_mode():
            model.generate(**inputs, streamer=streamer, **kwargs)
    except BaseException as e:  # handed to the main thread, which would otherwise wait forever
        errors.append(e)
        streamer.end()
