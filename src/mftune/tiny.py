"""A tiny tokenizer and tiny random-weight models, for tests, examples and demos that run offline.

The tokenizer is a byte-level BPE trained on the example data (`mftune.examples_gen`) plus a
fixed text (`mftune._tiny_corpus`), so `build_tokenizer` rebuilds it byte-identically. A copy ships inside
the package (`tokenizer_path()`). `build_tiny_model` writes a random-weight causal LM that loads
through the ordinary `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mftune._tiny_corpus import CORPUS

if TYPE_CHECKING:
    from transformers import PretrainedConfig

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, IM_START, IM_END)
VOCAB_SIZE = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TinyArch = Literal["llama", "qwen2", "gpt_neox", "phi3"]
TINY_ARCHITECTURES: tuple[TinyArch, ...] = ("llama", "qwen2", "gpt_neox", "phi3")

# ChatML. Assistant content and its closing <|im_end|> sit in {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly what is trained.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tokenizer_path() -> Path:
    """The tiny tokenizer shipped inside the package (a folder `AutoTokenizer` loads)."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer"


def _training_texts() -> list[str]:
    from mftune.examples_gen import generate_all

    texts = [CORPUS]
    for train, heldout in generate_all().values():
        for record in train + heldout:
            texts.extend(_strings(record))
    return texts


def _strings(value: object) -> list[str]:
    # Every string value of a record, whatever its format.
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def build_tokenizer(out_dir: str | Path) -> Path:
    """Train the tiny byte-level BPE tokenizer and save it, deterministically.

    Args:
        out_dir: folder to write `TOKENIZER_FILES` into (created if missing).

    Returns:
        `out_dir` as a `Path`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))  # byte-level: every byte has a token, no unk needed
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Untrimmed offsets: a token's span includes its leading space, so spans tile the text.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_pretrained may write extra files across transformers versions; keep only what loads it.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (Path(tmp) / name).exists():
                shutil.copyfile(Path(tmp) / name, out_dir / name)
    return out_dir


def build_tiny_config(
    arch: TinyArch,
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
) -> PretrainedConfig:
    """A transformers config for a tiny causal LM of one of `TINY_ARCHITECTURES`.

    `llama`, `qwen2` (biased q/k/v) and `phi3` (fused `qkv_proj`/`gate_up_proj`) use grouped-query
    attention with `num_kv_heads`; `gpt_neox` (`query_key_value`, `dense_h_to_4h`) has no GQA.

    Raises:
        ValueError: unknown `arch`.
    """
    from transformers import AutoConfig

    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "tie_word_embeddings": tie_word_embeddings,
        "dtype": "float32",
    }
    per_arch: dict[str, dict] = {
        "llama": {"num_key_value_heads": num_kv_heads, "head_dim": hidden_size // num_heads},
        "qwen2": {"num_key_value_heads": num_kv_heads},
        "phi3": {
            "num_key_value_heads": num_kv_heads,
            "original_max_position_embeddings": max_position_embeddings,
        },
        "gpt_neox": {},
    }
    if arch not in per_arch:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {list(TINY_ARCHITECTURES)}")
    return AutoConfig.for_model(arch, **common, **per_arch[arch])


def build_tiny_model(
    out_dir: str | Path,
    arch: TinyArch = "llama",
    *,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random-weight float32 causal LM plus its tokenizer, loadable with `from_pretrained`.

    Args:
        out_dir: folder to write (safetensors weights, config, generation config, tokenizer).
        arch: one of `TINY_ARCHITECTURES`.
        tokenizer_dir: tokenizer to pair with the model; defaults to `tokenizer_path()`.
        seed: seed of the weight initialisation (the caller's torch RNG is left untouched).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
        max_position_embeddings, tie_word_embeddings: see `build_tiny_config`.

    Returns:
        `out_dir` as a `Path`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or tokenizer_path())
    config = build_tiny_config(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Chat replies end with <|im_end|>, raw-text and role-marker samples with EOS: stop on either.
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, im_end]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
