"""Batch generation with the training chat template: conversations in, replies out (jsonl to jsonl)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mftune.data.pipeline import padding_id
from mftune.infer.load import load_for_inference, stop_token_ids

Messages = list[dict[str, str]]


def render_prompts(tokenizer, conversations: list[Messages]) -> list[str]:
    """Each conversation rendered by the tokenizer's chat template (the training one), followed by
    the assistant's opening."""
    return [
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for messages in conversations
    ]


def prompt_ids(tokenizer, messages: Messages) -> list[int]:
    """The token ids of a prompt as training tokenized it: the rendered prompt cut at every boundary of
    an earlier answer, each piece tokenized on its own (DESIGN.md §2).

    A template whose render of the history is not the start of its prompt (one that rewrites earlier
    turns) is tokenized whole, as `apply_chat_template` would.
    """
    from mftune.data.conversation import Conversation, Turn
    from mftune.data.jinja import JinjaTemplate
    from mftune.data.rendered import Rendered
    from mftune.data.tokenize import encode_pieces

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    spans: tuple = ()
    if any(m["role"] == "assistant" for m in messages):
        specials = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
        template = JinjaTemplate(tokenizer.chat_template, specials)
        try:
            history = template.render(Conversation(tuple(Turn(m["role"], m["content"]) for m in messages)))
        except ValueError:
            history = None
        if history is not None and text.startswith(history.text):
            spans = history.spans
    ids, _ = encode_pieces(tokenizer, text, Rendered(text, spans).pieces())
    return ids.tolist()


def generation_kwargs(
    model, tokenizer, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0
) -> dict:
    """`model.generate` arguments: greedy when `temperature` is 0, stopping at every stop token."""
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop_token_ids(model, tokenizer),
        "pad_token_id": padding_id(tokenizer),
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        # Unset the sampling knobs a checkpoint's generation config may carry, so greedy stays quiet.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@contextmanager
def _left_padded(tokenizer) -> Iterator[None]:
    # A decoder continues from the last position, so prompts are padded on the left.
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    tokenizer.pad_token = pad if pad is not None else tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad


@torch.inference_mode()
def generate_batch(
    model,
    tokenizer,
    conversations: list[Messages],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
) -> list[str]:
    """Generate the assistant's reply to each conversation.

    Prompts are rendered with the tokenizer's chat template and tokenized as training tokenized them
    (`prompt_ids`: without adding special tokens again, cut at earlier answers' boundaries). Batches
    are formed from prompts of similar length to waste little padding; results come back in input order.

    Args:
        model: A causal LM (or `PeftModel`) in eval mode.
        tokenizer: Its tokenizer, carrying the chat template.
        conversations: Each a list of `{"role", "content"}` messages ending before the reply.
        max_new_tokens: Longest reply, in tokens.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: Nucleus sampling threshold (sampling only).
        batch_size: Conversations per `generate` call.

    Returns:
        One reply per conversation, special tokens removed, stripped.
    """
    prompts = [prompt_ids(tokenizer, messages) for messages in conversations]
    replies = generate_from_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
    )
    return [samples[0].strip() for samples in replies]


@torch.inference_mode()
def generate_from_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    stop_strings: list[str] | None = None,
    seed: int | None = None,
) -> list[list[str]]:
    """`num_samples` continuations of each tokenized prompt, decoded without special tokens, unstripped.

    Sequences of similar length share a batch; `seed` seeds sampling once, before the first batch, so
    the same prompts, settings and engine give the same samples again. `stop_strings` end a sequence
    once its text contains one (the text is cut there by the caller).

    Returns:
        For each prompt, its `num_samples` texts.
    """
    kwargs = generation_kwargs(
        model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
    )
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    jobs = sorted(
        ((i, j) for i in range(len(prompts)) for j in range(num_samples)), key=lambda ij: len(prompts[ij[0]])
    )
    texts: list[list[str]] = [[""] * num_samples for _ in prompts]
    with _left_padded(tokenizer):
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            inputs = tokenizer.pad(
                {"input_ids": [prompts[i] for i, _ in chunk]}, padding=True, return_tensors="pt"
            ).to(model.device)
            output = model.generate(**inputs, **kwargs)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for (i, j), text in zip(chunk, decoded, strict=True):
                texts[i][j] = text
    return texts


def read_requests(path: str | Path) -> list[tuple[dict, Messages]]:
    """Records of a jsonl file with the conversation each asks to continue.

    A record holds `messages` (a list of `{"role", "content"}`), or `prompt` (a string, taken as
    one user turn); other keys are kept.

    Raises:
        ValueError: Lines that are not JSON objects with `messages` or `prompt`: every one of them, one
            per line of the message, each naming the file and line.
    """
    requests, errors = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                requests.append((record, _messages_of(record, f"{path}:{number}")))
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{number}: not JSON ({e})")
            except ValueError as e:
                errors.append(str(e))
    if errors:
        raise ValueError(f"{len(errors)} bad line(s) in {path}:\n  " + "\n  ".join(errors))
    return requests


def _messages_of(record: object, where: str) -> Messages:
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
        messages = record["messages"]
        if all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
            return messages
        raise ValueError(f"{where}: every message needs 'role' and 'content'")
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    raise ValueError(f"{where}: expected an object with 'messages' (a non-empty list) or 'prompt' (a string)")


def generate_file(
    model_dir: str | Path,
    input_jsonl: str | Path,
    output_jsonl: str | Path,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: str = "auto",
) -> int:
    """Answer every record of `input_jsonl`, writing each record plus `"output"` to `output_jsonl`.

    Every record is checked before the model is loaded; outputs are written batch by batch, in input order.

    Args:
        model_dir: A model, adapter or run folder (see `load_for_inference`).
        input_jsonl: Records with `messages` or `prompt` (see `read_requests`).
        output_jsonl: Where to write (overwritten).
        max_new_tokens, temperature, top_p, batch_size: See `generate_batch`.
        device, dtype: See `load_for_inference`.

    Returns:
        The number of records written.
    """
    requests = read_requests(input_jsonl)
    model, tokenizer = load_for_inference(model_dir, device=device, dtype=dtype)
    # Chunks of several batches let generate_batch group prompts by length while output streams out.
    chunk_size = batch_size * 8
    with open(output_jsonl, "w", encoding="utf-8") as out:
        for start in range(0, len(requests), chunk_size):
            chunk = requests[start : start + chunk_size]
            replies = generate_batch(
                model,
                tokenizer,
                [messages for _, messages in chunk],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                batch_size=batch_size,
            )
            for (record, _), reply in zip(chunk, replies, strict=True):
                out.write(json.dumps({**record, "output": reply}, ensure_ascii=False) + "\n")
            out.flush()
    return len(requests)
