"""Shared fixtures. Everything runs offline: a hidden download fails fast instead of hanging."""

from __future__ import annotations

import os

# Set before anything imports transformers / huggingface_hub, which read them once.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)
# Each pytest-xdist worker gets one core's worth of threads: two workers each running two torch threads
# on two cores spend most of their time contending (the model matrix ran 4x slower that way). Subprocesses
# the tests start inherit it.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mftune.tiny import build_tiny_model, tokenizer_path  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The tiny tokenizer shipped with the package."""
    return tokenizer_path()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    """The tiny tokenizer, loaded with `AutoTokenizer`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny random-weight llama (GQA) with the tiny tokenizer, built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_dir=tokenizer_dir)
