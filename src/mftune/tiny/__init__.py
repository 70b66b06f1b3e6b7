"""Offline assets for tests, examples and demos: the tiny tokenizer, tiny random-weight models, and the
generators of the example tasks' data."""

from mftune.tiny.models import (
    TINY_ARCHITECTURES,
    TINY_FAMILIES,
    TinyArch,
    build_tiny_config,
    build_tiny_model,
)
from mftune.tiny.tokenizer import TOKENIZER_FILES, VOCAB_SIZE, build_tokenizer, tokenizer_path

__all__ = [
    "TINY_ARCHITECTURES",
    "TINY_FAMILIES",
    "TOKENIZER_FILES",
    "VOCAB_SIZE",
    "TinyArch",
    "build_tiny_config",
    "build_tiny_model",
    "build_tokenizer",
    "tokenizer_path",
]
