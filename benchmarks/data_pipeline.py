"""Benchmark of the data pipeline: mftune's tokenize + pack against a naive per-segment baseline.

Generates a synthetic chat corpus (OpenAI `messages` records, lognormal lengths, some multi-turn, four
tasks of unequal size), then measures in one process:

- the naive baseline: each turn's segments tokenized separately and concatenated (MFTCoder's way), labels
  by segment, one process, no cache, rows padded per micro-batch;
- mftune: `prepare_data` with a fresh cache and `num_proc` processes, then `epoch_rows(0)` (isolated
  packing);
- mftune again, reading the cache;
- the fill ratio of isolated packing at `--max-seq-len`.

    python benchmarks/data_pipeline.py                    # 200 MB
    python benchmarks/data_pipeline.py --megabytes 5      # a quick check, under a minute

Every run uses the tiny tokenizer shipped with mftune; token counts are in its tokens. CPU seconds count
this process and its tokenizer workers, so they stay comparable when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TASK_SHARES = {"code_review": 0.45, "refactor": 0.3, "explain": 0.17, "unit_tests": 0.08}
MARKERS = {"system": "<s>system\n", "user": "<s>human\n", "assistant": "<s>bot\n"}
STOP = "</s>"
MEDIAN_TOKENS = 350
MAX_RECORD_TOKENS = 4000  # leaves room for role markers under a 4096-token row
BASELINE_BATCH = 8  # samples per padded micro-batch in the baseline

# The corpus vocabulary: English words, and code-like tokens drawn twice as often.
_WORDS_TEXT = (
    "the a of to and in is for that with this it on as be by value list item items result data "
    "function returns return number string key index count total first last next each new "
    "check update create remove find sort filter map error case test input output file path "
    "line name type size when if else not all any none true false use should would can"
)
_CODE_TEXT = (
    "def class self self.value self.items x y z i j k n m idx acc buf ( ) [ ] { } : , . = == != "
    "+ - * / // % += -= < > <= >= -> import from for in while range len append dict str int "
    "float bool None True False print yield lambda with as try except raise assert # ' \""
)
_CODE_EXTRA = [str(n) for n in range(100)] + ["\n", "\n    ", "\n        "]
_SYSTEM_PROMPTS = (
    "You are a careful senior software engineer.",
    "Answer with code only.",
    "You review Python code and explain problems briefly.",
)


# --- corpus ---------------------------------------------------------------------------------------


def _vocabulary() -> np.ndarray:
    code = _CODE_TEXT.split() + _CODE_EXTRA
    return np.array(_WORDS_TEXT.split() + code + code, dtype=object)


def tokens_per_word(tokenizer, vocab: np.ndarray, rng: np.random.Generator) -> float:
    """How many tokens of `tokenizer` one vocabulary word (with its separator) costs on average."""
    words = vocab[rng.integers(0, len(vocab), 20_000)].tolist()
    return len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) / len(words)


def _text(vocab: np.ndarray, rng: np.random.Generator, num_words: int) -> str:
    return " ".join(vocab[rng.integers(0, len(vocab), max(num_words, 1))].tolist())


def make_record(vocab: np.ndarray, rng: np.random.Generator, words_per_token: float) -> dict:
    """One chat record of lognormal length (median `MEDIAN_TOKENS`), 25% of them multi-turn."""
    tokens = min(rng.lognormal(np.log(MEDIAN_TOKENS), 0.75), MAX_RECORD_TOKENS)
    words = max(int(tokens * words_per_token), 8)
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": _SYSTEM_PROMPTS[rng.integers(len(_SYSTEM_PROMPTS))]})
    rounds = int(rng.choice([1, 2, 3], p=[0.75, 0.17, 0.08]))
    for share in rng.dirichlet(np.ones(rounds)):
        round_words = max(int(words * share), 4)
        user = max(int(round_words * rng.uniform(0.2, 0.5)), 2)
        messages.append({"role": "user", "content": _text(vocab, rng, user)})
        messages.append({"role": "assistant", "content": _text(vocab, rng, round_words - user)})
    return {"messages": messages}


def write_corpus(folder: Path, megabytes: float, seed: int, tokenizer) -> dict[str, Path]:
    """Write `megabytes` of records split over the tasks of `TASK_SHARES`; reuse a matching corpus.

    Returns:
        Task name -> its folder.
    """
    meta = {"megabytes": megabytes, "seed": seed, "median_tokens": MEDIAN_TOKENS, "version": 1}
    tasks = {name: folder / name for name in TASK_SHARES}
    meta_file = folder / "corpus.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) == meta:
        return tasks
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    vocab = _vocabulary()
    words_per_token = 1.0 / tokens_per_word(tokenizer, vocab, rng)
    for name, share in TASK_SHARES.items():
        tasks[name].mkdir(parents=True)
        budget = int(megabytes * share * 1e6)
        with (tasks[name] / "train.jsonl").open("w", encoding="utf-8") as f:
            while budget > 0:
                line = json.dumps(make_record(vocab, rng, words_per_token)) + "\n"
                f.write(line)
                budget -= len(line)
    meta_file.write_text(json.dumps(meta))
    return tasks


# --- naive baseline -------------------------------------------------------------------------------


def naive_tokenize(tokenizer, files: list[Path]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per record, per segment: markers and contents tokenized separately, ids concatenated.

    Returns:
        Per sample, int32 input ids and int32 labels (-100 outside assistant contents and their stop).
    """
    all_ids, all_labels = [], []
    encode = tokenizer.encode
    newline = encode("\n", add_special_tokens=False)
    marker_ids = {role: encode(m, add_special_tokens=False) for role, m in MARKERS.items()}
    for path in files:
        with path.open(encoding="utf-8") as f:
            for line in f:
                ids: list[int] = []
                labels: list[int] = []
                for message in json.loads(line)["messages"]:
                    role = message["role"]
                    head = marker_ids[role]
                    ids += head
                    labels += [-100] * len(head)
                    if role == "assistant":
                        body = encode(message["content"] + STOP, add_special_tokens=False)
                        labels += body
                    else:
                        body = encode(message["content"], add_special_tokens=False)
                        labels += [-100] * len(body)
                    ids += body + newline
                    labels += [-100] * len(newline)
                all_ids.append(np.asarray(ids, dtype=np.int32))
                all_labels.append(np.asarray(labels, dtype=np.int32))
    return all_ids, all_labels


def padding_fill(lengths: np.ndarray, batch: int) -> float:
    """Real tokens over padded capacity when consecutive samples are padded to the longest of each batch."""
    padded = sum(
        int(lengths[i : i + batch].max()) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch)
    )
    return float(lengths.sum()) / padded


# --- mftune ---------------------------------------------------------------------------------------


def mftune_config(tasks: dict[str, Path], cache_dir: Path, num_proc: int, max_seq_len: int):
    from mftune.config import validate_config
    from mftune.tiny import tokenizer_path

    return validate_config(
        {
            "model": {"name_or_path": str(tokenizer_path())},
            "data": {
                "tasks": {name: {"path": str(path)} for name, path in tasks.items()},
                "cache_dir": str(cache_dir),
                "max_seq_len": max_seq_len,
                "num_proc": num_proc,
                "packing": "isolated",
                "valid_ratio": 0.0,
            },
        }
    )


def row_fill(rows, max_len: int) -> float:
    return sum(e - s for row in rows for _, _, s, e in row) / (len(rows) * max_len)


# --- report ---------------------------------------------------------------------------------------


@dataclass
class Timing:
    """One measured setup: wall and CPU seconds (this process and its finished children)."""

    setup: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    tokens: int | None = None

    @property
    def rate(self) -> float | None:
        return self.tokens / self.wall_s if self.tokens else None


@contextmanager
def measure(timing: Timing):
    """Add the wall and CPU time of the block to `timing`."""
    before, cpu_before = time.perf_counter(), _cpu_seconds()
    yield timing
    timing.wall_s += time.perf_counter() - before
    timing.cpu_s += _cpu_seconds() - cpu_before


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def markdown_table(timings: list[Timing]) -> str:
    baseline = timings[0].rate
    lines = ["| setup | seconds | CPU seconds | tokens/s | vs baseline |", "|---|---:|---:|---:|---:|"]
    for t in timings:
        rate = f"{t.rate:,.0f}" if t.rate else "-"
        ratio = f"{t.rate / baseline:.2f}x" if t.rate and baseline else "-"
        lines.append(f"| {t.setup} | {t.wall_s:.2f} | {t.cpu_s:.2f} | {rate} | {ratio} |")
    return "\n".join(lines)


# --- run ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> None:
    from transformers import AutoTokenizer

    from mftune.data.pipeline import prepare_data
    from mftune.tiny import tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    start = time.perf_counter()
    tasks = write_corpus(workdir / "corpus", args.megabytes, args.seed, tokenizer)
    files = [path / "train.jsonl" for path in tasks.values()]
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"corpus: {size_mb:.0f} MB in {workdir / 'corpus'} ({time.perf_counter() - start:.1f} s)")

    base = Timing("naive: per-segment tokenize, 1 process, no cache, padding")
    with measure(base):
        base_ids, _ = naive_tokenize(tokenizer, files)
        base_lengths = np.array([len(ids) for ids in base_ids])
        base_fill = padding_fill(base_lengths, BASELINE_BATCH)
    base.tokens = int(base_lengths.sum())

    cache_dir = workdir / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = mftune_config(tasks, cache_dir, args.num_proc, args.max_seq_len)
    total = Timing(f"mftune: prepare_data + epoch_rows, num_proc={args.num_proc}, cold cache")
    tokenize, pack = Timing("&nbsp;&nbsp;of which prepare_data"), Timing("&nbsp;&nbsp;of which epoch_rows")
    with measure(total):
        with measure(tokenize):
            data = prepare_data(cfg, tokenizer)
        with measure(pack):
            rows = data.epoch_rows(0)
    total.tokens = tokenize.tokens = sum(len(t.tokenized.input_ids) for t in data.tasks)
    warm = Timing("mftune: prepare_data, warm cache")
    with measure(warm):
        assert all(t.from_cache for t in prepare_data(cfg, tokenizer).tasks)

    mine = [t.tokenized.sample(i)[0] for t in data.tasks for i in range(len(t.tokenized))]
    differ = sum(not np.array_equal(a, b) for a, b in zip(mine, base_ids, strict=False))
    lengths = np.concatenate([t.tokenized.lengths for t in data.tasks])
    print(
        f"records: {sum(t.tokenized.counts['records'] for t in data.tasks):,} "
        f"({', '.join(f'{t.name} {len(t.tokenized):,}' for t in data.tasks)}), "
        f"dropped over-long: {sum(t.tokenized.counts['overlong'] for t in data.tasks)}"
    )
    print(
        f"tokens: {total.tokens:,}; per record: median {int(np.median(lengths))}, "
        f"p90 {int(np.percentile(lengths, 90))}, p99 {int(np.percentile(lengths, 99))}, max {int(lengths.max())}"
    )
    print(f"samples whose baseline ids differ from mftune's (= inference's): {differ:,} of {len(mine):,}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, load average {load}\n")
    print(markdown_table([base, total, tokenize, pack, warm]))
    print(
        f"\nisolated packing at {args.max_seq_len}: fill {row_fill(rows, args.max_seq_len):.4f} "
        f"in {len(rows):,} rows (goal >= 0.98); "
        f"baseline padding in batches of {BASELINE_BATCH}: fill {base_fill:.4f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200, help="corpus size (default 200)")
    parser.add_argument("--num-proc", type=int, default=2, help="mftune tokenizer processes (default 2)")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="packed row length (default 4096)")
    parser.add_argument(
        "--workdir", type=Path, help="corpus (reused when it matches) and cache; default: a temporary folder"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # records up to 4096 tokens exceed the tiny tokenizer's 2048 hint
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mftune-bench-"))
    try:
        run(args, workdir)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            print(f"kept {workdir}")


if __name__ == "__main__":
    main()
