"""OpenAI request bodies, checked field by field: a bad one is a 400 naming the field, as OpenAI's are.

Only what the server does is accepted. A field it cannot honour (tools, logprobs, a response format,
penalties) is refused by name rather than ignored, so a client never believes it got what it asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Accepted and without effect: bookkeeping fields some clients always send.
IGNORED = {"user", "metadata", "store", "service_tier"}
ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # OpenAI's own limit


class ApiError(Exception):
    """An error answered as OpenAI answers: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}
        return {
            "error": {
                "message": self.message,
                "type": kind.get(
                    self.status, "invalid_request_error" if self.status < 500 else "server_error"
                ),
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = 4096
    max_n: int = 8


@dataclass(frozen=True)
class Sampling:
    """The generation settings of one request."""

    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, str]]
    sampling: Sampling


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompts: list[str]
    sampling: Sampling


_CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
    "stop", "stream", "stream_options", "frequency_penalty", "presence_penalty", "logprobs",
}  # fmt: skip
_COMPLETION_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
    "stream_options", "frequency_penalty", "presence_penalty", "logprobs", "echo", "best_of",
}  # fmt: skip


def parse_chat(body: Any, limits: Limits) -> ChatRequest:
    """A `/v1/chat/completions` body as a `ChatRequest`.

    Raises:
        ApiError: 400 naming the first bad field.
    """
    body = _object(body)
    _known(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    if parsed[-1]["role"] == "assistant":
        raise _bad(f"messages[{len(parsed) - 1}]", "the last message must be the user's (or the system's)")
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return ChatRequest(_model(body), parsed, _sampling(body, limits, tokens, key))


def parse_completion(body: Any, limits: Limits) -> CompletionRequest:
    """A `/v1/completions` body as a `CompletionRequest` (`prompt`: a string or a list of strings).

    Raises:
        ApiError: 400 naming the first bad field.
    """
    body = _object(body)
    _known(body, _COMPLETION_FIELDS)
    for flag in ("echo",):
        if body.get(flag):
            raise _bad(flag, f"'{flag}' is not supported")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of", "'best_of' other than 1 is not supported")
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt", "'prompt' is required")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _bad(
            "prompt", "'prompt' must be a string or a non-empty list of strings (token ids are not supported)"
        )
    if not all(p for p in prompts):
        raise _bad("prompt", "a prompt is empty")
    sampling = _sampling(body, limits, body.get("max_tokens", 16), "max_tokens")
    return CompletionRequest(_model(body), prompts, sampling)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _known(body: dict, fields: set[str]) -> None:
    for key in body:
        if key not in fields and key not in IGNORED:
            raise _bad(key, f"'{key}' is not supported by this server")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise _bad(key, f"'{key}' is not supported (only 0)")
    if body.get("logprobs") not in (None, False, 0):
        raise _bad("logprobs", "'logprobs' is not supported")


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "'model' must be a string")
    return model


def _message(message: Any, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _bad(where, f"{where} must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise _bad(f"{where}.content[{j}]", "only text content parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise _bad(f"{where}.content", f"{where}.content must be a string")
    if not content.strip():
        raise _bad(f"{where}.content", f"{where}.content is empty")
    return {"role": role, "content": content}


def _sampling(body: dict, limits: Limits, max_tokens: Any, key: str) -> Sampling:
    if max_tokens is not None:
        if not _integer(max_tokens) or max_tokens < 1:
            raise _bad(key, f"'{key}' must be a positive integer, got {max_tokens!r}")
        if max_tokens > limits.max_tokens:
            raise _bad(key, f"'{key}' is {max_tokens}; this server allows at most {limits.max_tokens}")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("top_p", "'top_p' must be above 0")
    n = body.get("n", 1)
    if not _integer(n) or not 1 <= n <= limits.max_n:
        raise _bad("n", f"'n' must be an integer from 1 to {limits.max_n}, got {n!r}")
    seed = body.get("seed")
    if seed is not None and not _integer(seed):
        raise _bad("seed", "'seed' must be an integer")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOPS
    ):
        raise _bad("stop", f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("stream_options", "'stream_options' supports only include_usage")
    if options and not stream:
        raise _bad("stream_options", "'stream_options' needs 'stream': true")
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        n=n,
        seed=seed,
        stop=tuple(stops),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _bad(key, f"'{key}' must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")
