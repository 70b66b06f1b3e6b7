"""Dynamic batching over `model.generate`: requests that arrive together are generated in one batch.

One worker thread owns the model. It takes the first waiting sequence, gathers whatever else arrives
within `wait_s` (up to `max_batch` sequences), and runs one left-padded `generate` for all of them.
Each row keeps its own settings, which `generate` alone cannot do for a batch, so two small hooks are
written here:

- `RowSampler`, a logits processor: greedy rows take the argmax; sampled rows apply their own
  temperature and top-p and draw from their own seeded generator. It returns one-hot scores, so
  `generate` runs greedy and keeps the chosen token: a row's draws never depend on its neighbours.
- `RowStopper`, a stopping criterion: a row ends at a stop token, at its own `max_new_tokens`, at one
  of its own stop strings, or when its client has gone; it streams each row's new text as it comes,
  holding back what could still become a stop string.

Why not transformers' continuous batching: its per-request settings cover temperature and top-p, not
greedy and sampled requests side by side, seeds or stop strings, and on the CPU its paged cache took
20 s to start for a tiny model. Continuous batching at scale is what the vLLM engine is for.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria


@dataclass
class Job:
    """One sequence to generate, and where its text goes.

    `emit(kind, payload)` is called from the worker thread: ("delta", text) while streaming, then
    ("done", Result) or ("error", message). `cancelled` is set when nobody waits any more.
    """

    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    emit: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Result:
    """A finished sequence: its text (cut before a stop string), why it ended, and token counts."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class DynamicBatcher:
    """The worker thread that batches `Job`s onto one model."""

    def __init__(
        self,
        model,
        tokenizer,
        stop_ids: list[int],
        *,
        max_batch: int = 16,
        wait_s: float = 0.01,
        max_queue: int = 1024,
    ):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.max_batch, self.wait_s = max_batch, wait_s
        self.pending: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self.batches = self.sequences = self.cancelled = 0  # reported by /health
        self._thread = threading.Thread(target=self._loop, name="mftune-batcher", daemon=True)
        self._thread.start()

    def counts(self) -> dict[str, int]:
        """Batches run, sequences generated in them, and sequences stopped because their client left."""
        return {"batches": self.batches, "sequences": self.sequences, "cancelled": self.cancelled}

    def submit(self, job: Job) -> None:
        """Queue a sequence. Raises `queue.Full` when `max_queue` are already waiting."""
        self.pending.put_nowait(job)

    def close(self) -> None:
        """Stop after the batch in flight."""
        self.pending.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self.pending.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    job = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.pending.put(None)  # close after this batch
                    break
                batch.append(job)
            batch = [j for j in batch if not j.cancelled.is_set()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        try:
            self.cancelled += self._generate(batch)
        except Exception as err:  # one bad batch must not end the server
            for job in batch:
                job.emit("error", f"generation failed: {type(err).__name__}: {err}")
        self.batches += 1
        self.sequences += len(batch)

    @torch.inference_mode()
    def _generate(self, batch: list[Job]) -> int:
        """Generate every row of `batch`; the number of rows whose client left while they ran."""
        width = max(len(j.prompt) for j in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, job in enumerate(batch):  # left padding: every row's next token is at the end
            ids[row, width - len(job.prompt) :] = torch.tensor(job.prompt)
            mask[row, width - len(job.prompt) :] = 1
        device = self.model.device
        stopper = RowStopper(batch, width, self.tokenizer, set(self.stop_ids))
        self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(j.max_new_tokens for j in batch),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            logits_processor=[RowSampler(batch)],
            stopping_criteria=[stopper],
        )
        stopper.finish_all()
        return stopper.abandoned


class RowSampler(LogitsProcessor):
    """Per-row greedy or seeded temperature/top-p sampling, returned as one-hot scores."""

    def __init__(self, batch: list[Job]):
        self.jobs = batch
        self.generators = []
        for job in batch:
            generator = torch.Generator()
            generator.manual_seed(job.seed)
            self.generators.append(generator)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if all(job.temperature == 0 for job in self.jobs):
            return scores  # generate's own argmax
        chosen = torch.empty(scores.shape[0], dtype=torch.long)
        logits = scores.float().cpu()
        for row, job in enumerate(self.jobs):
            if job.temperature == 0:
                chosen[row] = logits[row].argmax()
                continue
            probs = torch.softmax(logits[row] / job.temperature, dim=-1)
            if job.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered > job.top_p  # keep the smallest set reaching top_p
                ordered[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, ordered)
            chosen[row] = torch.multinomial(probs, 1, generator=self.generators[row])[0]
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot[torch.arange(scores.shape[0]), chosen.to(scores.device)] = 0.0
        return one_hot


class RowStopper(StoppingCriteria):
    """Ends each row on its own terms and streams its text (see the module docstring)."""

    def __init__(self, batch: list[Job], prompt_width: int, tokenizer, stop_ids: set[int]):
        self.jobs, self.start, self.tokenizer, self.stop_ids = batch, prompt_width, tokenizer, stop_ids
        self.done = [False] * len(batch)
        self.sent = [0] * len(batch)  # characters already streamed
        self.tokens: list[list[int]] = [[] for _ in batch]
        self.hold = [max((len(s) for s in j.stop), default=1) - 1 for j in batch]
        self.abandoned = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for row, job in enumerate(self.jobs):
            if self.done[row]:
                continue
            self.tokens[row].append(last[row])
            if job.cancelled.is_set():
                self.abandoned += 1
                self._finish(row, "stop", emit=False)
            elif last[row] in self.stop_ids:
                self._finish(row, "stop")
            else:
                self._step(row)
        return torch.tensor(self.done, device=input_ids.device)

    def _text(self, row: int) -> str:
        ids = self.tokens[row]
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _step(self, row: int) -> None:
        job, text = self.jobs[row], self._text(row)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._finish(row, "stop", text=text[:cut])
        elif len(self.tokens[row]) >= job.max_new_tokens:
            self._finish(row, "length", text=text)
        else:
            safe = len(text) - self.hold[row]
            if text.endswith("\ufffd"):  # a character still being spelled out in bytes
                safe = min(safe, len(text) - 1)
            if safe > self.sent[row]:
                job.emit("delta", text[self.sent[row] : safe])
                self.sent[row] = safe

    def _finish(self, row: int, reason: str, *, text: str | None = None, emit: bool = True) -> None:
        self.done[row] = True
        if not emit:
            return
        job = self.jobs[row]
        text = self._text(row) if text is None else text
        if len(text) > self.sent[row]:
            job.emit("delta", text[self.sent[row] :])
        job.emit("done", Result(text, reason, len(job.prompt), len(self.tokens[row])))

    def finish_all(self) -> None:
        """Rows `generate` ended without us (every row at the batch's length limit)."""
        for row in range(len(self.jobs)):
            if not self.done[row]:
                with contextlib.suppress(Exception):
                    self._finish(row, "length", emit=not self.jobs[row].cancelled.is_set())
