"""From a config to tokenized, split, mixed and packed multi-task data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mftune.data.cache import TokenizedTask, TokenizeSettings, load_or_build
from mftune.data.collate import Sample
from mftune.data.mixture import (
    epoch_order,
    samples_per_epoch,
    sampling_probabilities,
    split_samples,
    stable_seed,
)
from mftune.data.packing import pack_contiguous, pack_isolated, pack_sequential
from mftune.data.reader import DataError
from mftune.data.templates import Template, build_template

_MAX_ERRORS_SHOWN = 50


class DataValidationError(ValueError):
    """Bad records found before training (`data.on_error: fail`); `errors` holds every one of them."""

    def __init__(self, errors: list[DataError]):
        self.errors = errors
        shown = "\n".join(f"  {e}" for e in errors[:_MAX_ERRORS_SHOWN])
        more = (
            f"\n  ... and {len(errors) - _MAX_ERRORS_SHOWN} more" if len(errors) > _MAX_ERRORS_SHOWN else ""
        )
        super().__init__(
            f"{len(errors)} bad record(s); fix them, or set data.on_error=skip to skip and count them:\n{shown}{more}"
        )


@dataclass
class TaskData:
    """One task's tokenized samples and its split.

    `train` and `test` index `tokenized`; `valid` indexes `valid_tokenized` (the same object unless the
    task has a `valid_path`). `test` (data.test_ratio) is never trained on nor validated.
    """

    name: str
    task_id: int
    tokenized: TokenizedTask
    valid_tokenized: TokenizedTask
    train: np.ndarray
    valid: np.ndarray
    loss_weight: float
    sampling_weight: float | None
    from_cache: bool
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


# A row of a packed batch: (task_id, sample_index, token_start, token_end) per piece.
Row = list[tuple[int, int, int, int]]


@dataclass
class MultiTaskData:
    """Everything the training loop needs from the data side."""

    tasks: list[TaskData]
    template: Template
    stop_token: str
    max_len: int
    packing: str
    packing_window: int
    sampling: str
    temperature: float
    seed: int

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def isolated(self) -> bool:
        """Whether samples never attend to each other (one per row, or isolated packing)."""
        return self.packing in ("none", "isolated")

    def errors(self) -> list[DataError]:
        """Every bad record of every task (training and valid files)."""
        out: list[DataError] = []
        for t in self.tasks:
            out += t.tokenized.errors
            if t.valid_tokenized is not t.tokenized:
                out += t.valid_tokenized.errors
        return out

    def epoch_counts(self) -> dict[str, int]:
        """Samples drawn from each task in one epoch of the mixture."""
        sizes = {t.name: len(t.train) for t in self.tasks}
        explicit = {t.name: t.sampling_weight for t in self.tasks}
        probs = sampling_probabilities(sizes, self.sampling, self.temperature, explicit)
        return samples_per_epoch(sizes, probs)

    def epoch_rows(self, epoch: int) -> list[Row]:
        """The rows of one training epoch, in training order (a pure function of the epoch: exact resume)."""
        sizes = {t.name: len(t.train) for t in self.tasks}
        order = epoch_order(sizes, self.epoch_counts(), epoch, self.seed)
        pieces = [(t, int(self.tasks[t].train[i])) for t, i in order]
        return self._pack(pieces, lambda t: self.tasks[t].tokenized, stable_seed(self.seed, "rows", epoch))

    def valid_rows(self, task_id: int) -> list[Row]:
        """The validation rows of one task, in a fixed order."""
        task = self.tasks[task_id]
        pieces = [(task_id, int(i)) for i in task.valid]
        return self._pack(pieces, lambda t: self.tasks[t].valid_tokenized, None)

    def _pack(self, pieces, tokenized_of, shuffle_seed: int | None) -> list[Row]:
        # `lengths` is computed from the offsets on each access: once per task, not once per piece.
        task_lengths = {t: np.asarray(tokenized_of(t).lengths) for t in {t for t, _ in pieces}}
        lengths = np.array([task_lengths[t][i] for t, i in pieces], dtype=np.int64)
        if self.packing == "none":
            return [[(t, i, 0, int(n))] for (t, i), n in zip(pieces, lengths, strict=True)]
        if self.packing == "contiguous":
            return [
                [(pieces[k][0], pieces[k][1], s, e) for k, s, e in row]
                for row in pack_contiguous(lengths, self.max_len)
            ]
        if self.packing == "sequential":  # in the epoch's (already shuffled) order, as MFTCoder's pack
            return [
                [(pieces[k][0], pieces[k][1], 0, int(lengths[k])) for k in row]
                for row in pack_sequential(lengths, self.max_len)
            ]
        rows = [
            [(pieces[k][0], pieces[k][1], 0, int(lengths[k])) for k in row]
            for row in pack_isolated(lengths, self.max_len, self.packing_window)
        ]
        if shuffle_seed is not None:
            # Best-fit decreasing creates rows longest-first; shuffle so batches do not follow length.
            perm = np.random.default_rng(shuffle_seed).permutation(len(rows))
            rows = [rows[k] for k in perm]
        return rows

    def row_samples(self, row: Row, *, valid: bool = False) -> list[Sample]:
        """The `Sample`s (token ids and trained masks) of one row."""
        out = []
        for task_id, index, start, end in row:
            task = self.tasks[task_id]
            tokenized = task.valid_tokenized if valid else task.tokenized
            ids, trained = tokenized.sample(index)
            out.append(
                Sample(
                    input_ids=np.asarray(ids[start:end]),
                    trained=np.asarray(trained[start:end]),
                    task_id=task_id,
                    sample_id=index,
                    is_start=start == 0,
                )
            )
        return out


def load_tokenizer(model_cfg):
    """The tokenizer a config names (`model.tokenizer`, else the model's), loaded offline-safe by path or name."""
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoTokenizer

    from mftune.config.errors import unloadable

    name = model_cfg.tokenizer or model_cfg.name_or_path
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, HFValidationError) as err:
        raise unloadable(
            "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path", name, err
        ) from err


def padding_id(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its EOS (padding is masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prepare_data(cfg, tokenizer, *, rank: int = 0, raise_on_errors: bool = True) -> MultiTaskData:
    """Tokenize (or load from cache) every task, split it and check it.

    Args:
        cfg: the whole mftune `Config`.
        tokenizer: a fast Hugging Face tokenizer.
        rank: this process's rank (only rank 0 builds caches).
        raise_on_errors: False to return the data with its errors (for `mftune data validate`).

    Raises:
        DataValidationError: bad records under `data.on_error: fail`, listing all of them.
    """
    d = cfg.data
    template, stop_token = build_template(d.template, tokenizer, d.train_on)
    settings = TokenizeSettings(
        tokenizer, template, stop_token, d.max_seq_len, d.overlong, d.template.kind, d.train_on
    )
    tasks = []
    for task_id, (name, task_cfg) in enumerate(d.tasks.items()):
        tokenized, hit = load_or_build(
            name, task_cfg.path, task_cfg.format, settings, d.cache_dir, d.num_proc, rank=rank
        )
        if task_cfg.valid_path:
            valid_tok, _ = load_or_build(
                f"{name}.valid",
                task_cfg.valid_path,
                task_cfg.format,
                settings,
                d.cache_dir,
                d.num_proc,
                rank=rank,
            )
            train, _, test = split_samples(len(tokenized), 0.0, d.seed, name, test_ratio=d.test_ratio)
            valid = np.arange(len(valid_tok))
        else:
            valid_tok = tokenized
            ratio = d.valid_ratio if task_cfg.valid_ratio is None else task_cfg.valid_ratio
            train, valid, test = split_samples(
                len(tokenized), ratio, d.seed, name, d.max_valid_samples, d.test_ratio
            )
        tasks.append(
            TaskData(
                name=name,
                task_id=task_id,
                tokenized=tokenized,
                valid_tokenized=valid_tok,
                train=train,
                valid=valid,
                loss_weight=task_cfg.loss_weight,
                sampling_weight=task_cfg.sampling_weight,
                from_cache=hit,
                test=test,
            )
        )
    data = MultiTaskData(
        tasks=tasks,
        template=template,
        stop_token=stop_token,
        max_len=d.max_seq_len,
        packing=d.packing,
        packing_window=d.packing_window,
        sampling=d.sampling,
        temperature=d.temperature,
        seed=d.seed,
    )
    errors = data.errors()
    if errors and d.on_error == "fail" and raise_on_errors:
        raise DataValidationError(errors)
    for task in tasks:
        if len(task.train) == 0 and raise_on_errors:
            raise ValueError(
                f"task '{task.name}' has no training sample left ({Path(task.tokenized.files[0]).parent})"
            )
    return data
