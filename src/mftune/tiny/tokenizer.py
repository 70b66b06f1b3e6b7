"""The tiny tokenizer: a byte-level BPE with a ChatML chat template, for tests and demos that run offline.

It is trained on the example data (`mftune.tiny.examples`) plus a fixed text (`mftune.tiny.corpus`), so
`build_tokenizer` rebuilds it byte-identically. A copy ships inside the package (`tokenizer_path()`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mftune.tiny.corpus import CORPUS

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, IM_START, IM_END)
VOCAB_SIZE = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

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
    from mftune.tiny.examples import generate_all

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
