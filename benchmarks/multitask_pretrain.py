"""The study's base model: a tiny Llama-shaped model pre-trained by mftune itself on a generated corpus.

`pretrained_base` writes the corpus (`multitask_data.write_corpus`), builds the random-weight model and
trains it with plain `mftune train` on the corpus as `text` records with `packing: contiguous` (every
token predicted once), full fine-tuning, one process. Everything is seeded and the CPU run is
deterministic, so two builds give the same weights. The result is cached under the work folder, keyed
by its settings: a second call with the same settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from multitask_data import write_corpus

SPEC_FILE = "pretrain.json"


@dataclass(frozen=True)
class PretrainSpec:
    """Everything the base depends on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    corpus_records: int
    steps: int
    batch: int
    learning_rate: float
    heldout: int  # held-out problems per task and seed that the corpus leaves out
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def pretrained_base(workdir: Path, spec: PretrainSpec, threads: int | None = None) -> tuple[Path, bool]:
    """The pre-trained base model folder for `spec`, and whether it was built now (False: from the cache).

    Raises:
        RuntimeError: the pre-training run failed (its log is named).
    """
    from mftune.tiny import build_tiny_model

    folder = workdir / "base" / spec.key()
    final = folder / "run" / "final"
    if final.is_dir() and _saved_spec(folder) == asdict(spec):
        return final, False
    shutil.rmtree(folder / "run", ignore_errors=True)  # an interrupted build starts again from nothing
    folder.mkdir(parents=True, exist_ok=True)
    write_corpus(folder / "corpus" / "train.jsonl", spec.corpus_records, spec.seed, spec.heldout)
    model = build_tiny_model(
        folder / "random",
        seed=spec.seed,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_heads // 2,
        intermediate_size=spec.intermediate_size,
    )
    config = folder / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_config(folder, model, spec), sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = folder / "pretrain.log"
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "mftune.cli", "train", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        ).returncode
    if code != 0:
        raise RuntimeError(f"pre-training failed (exit {code}); see {log}")
    (folder / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=1))
    return final, True


def _saved_spec(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None


def _config(folder: Path, model: Path, spec: PretrainSpec) -> dict:
    return {
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "finetune": {"method": "full"},
        "data": {
            "tasks": {"corpus": {"path": str(folder / "corpus")}},
            "max_seq_len": 256,
            "packing": "contiguous",
            "valid_ratio": 0.02,
            "seed": spec.seed,
            "cache_dir": str(folder / "cache"),
            "num_proc": 1,
        },
        "train": {
            "output_dir": str(folder / "run"),
            "seed": spec.seed,
            "loss": "token",
            "max_steps": spec.steps,
            "global_batch_size": spec.batch,
            "micro_batch_size": spec.batch,
            "learning_rate": spec.learning_rate,
            "min_lr": spec.learning_rate / 10,
            "warmup_steps": max(1, spec.steps // 50),
            "eval_every": max(1, spec.steps // 4),
            "log_every": max(1, spec.steps // 20),
            "save_every": spec.steps,
            "keep_last": 1,
            "resume": "never",
            "tensorboard": False,
            "plots": False,
        },
    }
