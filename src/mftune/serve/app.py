"""The OpenAI-compatible HTTP layer of `mftune serve`'s embedded engine (FastAPI).

Endpoints: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` and
`POST /v1/completions`, streaming as server-sent events. Responses are built from the `openai`
package's own types, so they are the schema its clients parse. What mftune adds around them: prompts
tokenized as training tokenized them (`prompt_ids`), the run's stop token, an optional API key checked in
constant time, request limits answered as OpenAI-style 400s, and a disconnected client's sequences
stopped at their next token.

(No `from __future__ import annotations` here: FastAPI reads the route functions' annotations, and
`Request` is imported inside `build_app`, as FastAPI is an optional dependency.)
"""

import asyncio
import hmac
import json
import os
import queue
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mftune.serve.batcher import DynamicBatcher, Job, Result
from mftune.serve.requests import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Limits,
    parse_chat,
    parse_completion,
)

OPEN = ("/health",)  # served without the API key


@dataclass
class Served:
    """The model behind the server."""

    name: str
    tokenizer: object
    batcher: DynamicBatcher
    context: int | None
    limits: Limits
    created: int


def build_app(served: Served, *, api_key: str | None = None, max_body_bytes: int = 1 << 20):
    """The FastAPI application serving `served`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="mftune serve", docs_url=None, redoc_url=None, openapi_url=None)
    key = api_key.encode() if api_key else None

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if key is not None and request.url.path not in OPEN:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
                error = ApiError(
                    401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key"
                )
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", **served.batcher.counts()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(served, model_id)
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        parsed = parse_chat(await _json(request, max_body_bytes), served.limits)
        _check_model(served, parsed.model)
        from mftune.infer.generate import prompt_ids

        prompt = prompt_ids(served.tokenizer, parsed.messages)
        run = _start(served, [prompt], parsed.sampling, request, "messages")
        if parsed.sampling.stream:
            return StreamingResponse(_chat_stream(served, parsed, run), media_type="text/event-stream")
        return JSONResponse(await _chat_response(served, parsed, run))

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = parse_completion(await _json(request, max_body_bytes), served.limits)
        _check_model(served, parsed.model)
        prompts = [served.tokenizer(p)["input_ids"] for p in parsed.prompts]
        run = _start(served, prompts, parsed.sampling, request, "prompt")
        if parsed.sampling.stream:
            return StreamingResponse(_completion_stream(served, parsed, run), media_type="text/event-stream")
        return JSONResponse(await _completion_response(served, parsed, run))

    return app


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "mftune"}


def _check_model(served: Served, name: str | None) -> None:
    if name is not None and name != served.name:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{served.name}'",
                       param="model", code="model_not_found")  # fmt: skip


async def _json(request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(400, f"the request body is over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(400, f"the request body is over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None


@dataclass
class _Run:
    """A request's sequences in flight: job i's events arrive on `events` as (i, kind, payload)."""

    jobs: list[Job]
    events: asyncio.Queue
    request: object
    prompt_tokens: int

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()


def _start(served: Served, prompts: list[list[int]], sampling, request, field: str) -> _Run:
    """Queue n sequences per prompt (choice index = prompt index × n + sample)."""
    for i, prompt in enumerate(prompts):
        if served.context is not None and len(prompt) >= served.context:
            where = field if len(prompts) == 1 else f"{field}[{i}]"
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; the model's context is {served.context}",
                           param=where, code="context_length_exceeded")  # fmt: skip
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    base_seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
    jobs = []
    for p, prompt in enumerate(prompts):
        room = served.context - len(prompt) if served.context is not None else served.limits.max_tokens
        max_new = min(sampling.max_tokens or served.limits.max_tokens, room, served.limits.max_tokens)
        for j in range(sampling.n):
            index = p * sampling.n + j

            def emit(kind: str, payload: object, index: int = index) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))

            seed = base_seed + index  # every sequence its own draws, even for one seed
            jobs.append(Job(prompt, max_new, sampling.temperature, sampling.top_p, seed, sampling.stop, emit))
    run = _Run(jobs, events, request, sum(len(p) for p in prompts))
    try:
        for job in jobs:
            served.batcher.submit(job)
    except queue.Full:
        run.cancel()
        raise ApiError(429, "too many requests are waiting; retry later", code="server_busy") from None
    return run


async def _next_event(run: _Run) -> tuple[int, str, object]:
    """The next event of the run, cancelling it if its client has gone."""
    while True:
        try:
            return await asyncio.wait_for(run.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await run.request.is_disconnected():
                run.cancel()
                raise asyncio.CancelledError from None


async def _results(run: _Run) -> list[Result]:
    results: list[Result | None] = [None] * len(run.jobs)
    try:
        while any(r is None for r in results):
            index, kind, payload = await _next_event(run)
            if kind == "done":
                results[index] = payload
            elif kind == "error":
                raise ApiError(500, str(payload), code="generation_failed")
    except BaseException:
        run.cancel()
        raise
    return results  # type: ignore[return-value]


def _usage(run: _Run, results: list[Result]):
    from openai.types import CompletionUsage

    completion = sum(r.completion_tokens for r in results)
    return CompletionUsage(
        prompt_tokens=run.prompt_tokens,
        completion_tokens=completion,
        total_tokens=run.prompt_tokens + completion,
    )


async def _chat_response(served: Served, parsed: ChatRequest, run: _Run) -> dict:
    from openai.types.chat import ChatCompletion, ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice

    results = await _results(run)
    choices = [
        Choice(
            index=i,
            message=ChatCompletionMessage(role="assistant", content=r.text),
            finish_reason=r.finish_reason,
        )
        for i, r in enumerate(results)
    ]
    response = ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion", created=int(time.time()),
        model=served.name, choices=choices, usage=_usage(run, results),
    )  # fmt: skip
    return response.model_dump(exclude_none=True)


async def _completion_response(served: Served, parsed: CompletionRequest, run: _Run) -> dict:
    from openai.types import Completion, CompletionChoice

    results = await _results(run)
    choices = [
        CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)
    ]
    response = Completion(
        id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()),
        model=served.name, choices=choices, usage=_usage(run, results),
    )  # fmt: skip
    return response.model_dump(exclude_none=True)


def _sse(payload) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


async def _stream(run: _Run, on_delta, on_done, on_usage) -> AsyncIterator[str]:
    """Server-sent events of a run: each delta and finish as they come, usage if asked, then [DONE]."""
    results: list[Result | None] = [None] * len(run.jobs)
    try:
        while any(r is None for r in results):
            index, kind, payload = await _next_event(run)
            if kind == "delta":
                yield on_delta(index, payload)
            elif kind == "done":
                results[index] = payload
                yield on_done(index, payload)
            else:
                yield f"data: {json.dumps(ApiError(500, str(payload), code='generation_failed').body())}\n\n"
                return
        if on_usage is not None:
            yield on_usage(_usage(run, results))  # type: ignore[arg-type]
        yield "data: [DONE]\n\n"
    finally:  # a client that leaves mid-stream frees its rows at their next token
        run.cancel()


def _chat_stream(served: Served, parsed: ChatRequest, run: _Run) -> AsyncIterator[str]:
    from openai.types.chat import ChatCompletionChunk
    from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta

    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices, usage=None) -> str:
        return _sse(ChatCompletionChunk(id=ident, object="chat.completion.chunk", created=created,
                                        model=served.name, choices=choices, usage=usage))  # fmt: skip

    async def events() -> AsyncIterator[str]:
        for i in range(len(run.jobs)):  # the role comes first, in a delta of its own
            yield chunk([Choice(index=i, delta=ChoiceDelta(role="assistant", content=""))])
        usage = (lambda u: chunk([], u)) if parsed.sampling.include_usage else None
        async for line in _stream(
            run,
            lambda i, text: chunk([Choice(index=i, delta=ChoiceDelta(content=text))]),
            lambda i, r: chunk([Choice(index=i, delta=ChoiceDelta(), finish_reason=r.finish_reason)]),
            usage,
        ):
            yield line

    return events()


def _completion_stream(served: Served, parsed: CompletionRequest, run: _Run) -> AsyncIterator[str]:
    from openai.types import Completion, CompletionChoice

    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices, usage=None) -> str:
        return _sse(Completion(id=ident, object="text_completion", created=created, model=served.name,
                               choices=choices, usage=usage))  # fmt: skip

    usage = (lambda u: chunk([], u)) if parsed.sampling.include_usage else None
    return _stream(
        run,
        # A delta has no finish reason yet, which the type's validation does not allow: built unvalidated.
        lambda i, text: chunk([CompletionChoice.model_construct(index=i, text=text, finish_reason=None)]),
        lambda i, r: chunk([CompletionChoice(index=i, text="", finish_reason=r.finish_reason)]),
        usage,
    )
