"""Tiny random-weight causal LMs of a few architectures, written so `from_pretrained` loads them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mftune.tiny.tokenizer import IM_END, tokenizer_path

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The architectures most tests use: two with GQA (one with biased q/k/v), and two with other projection
# names (fused qkv_proj/gate_up_proj; query_key_value/dense_h_to_4h) that catch LoRA target assumptions.
TINY_ARCHITECTURES = ("llama", "qwen2", "gpt_neox", "phi3")
# Every family of the model matrix (docs/models.md): dense, mixture-of-experts, sliding-window,
# soft-capped, multi-latent-attention and multi-query models.
TINY_FAMILIES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma2", "gemma3_text",
    "phi3", "starcoder2", "gpt_bigcode", "gpt_neox", "deepseek_v3", "glm4", "olmo2", "granite",
)  # fmt: skip
TinyArch = Literal[
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma2", "gemma3_text",
    "phi3", "starcoder2", "gpt_bigcode", "gpt_neox", "deepseek_v3", "glm4", "olmo2", "granite",
]  # fmt: skip


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
    """A transformers config for a tiny causal LM of one of `TINY_FAMILIES`.

    Most use grouped-query attention with `num_kv_heads`; `gpt_neox` has no GQA and `gpt_bigcode` is
    multi-query; `deepseek_v3` has multi-latent attention; the mixture-of-experts ones have 4 experts, 2 per token; the sliding-window ones a window
    of 16 tokens.

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
    head_dim = hidden_size // num_heads
    gqa = {"num_key_value_heads": num_kv_heads}
    experts = {"num_experts_per_tok": 2, "moe_intermediate_size": intermediate_size // 4}
    window = {"sliding_window": 16}  # shorter than the test samples, so the window matters
    per_arch: dict[str, dict] = {
        "llama": {**gqa, "head_dim": head_dim},
        "mistral": {**gqa, **window},
        "mixtral": {**gqa, "num_local_experts": 4, "num_experts_per_tok": 2},
        "qwen2": gqa,
        "qwen2_moe": {
            **gqa,
            **experts,
            "num_experts": 4,
            "shared_expert_intermediate_size": intermediate_size,
        },
        "qwen3": {**gqa, "head_dim": head_dim},
        "qwen3_moe": {**gqa, **experts, "num_experts": 4, "head_dim": head_dim},
        "gemma2": {**gqa, **window, "head_dim": head_dim},
        "gemma3_text": {**gqa, **window, "head_dim": head_dim},
        "phi3": {**gqa, "original_max_position_embeddings": max_position_embeddings},
        "starcoder2": gqa,
        "gpt_bigcode": {
            "n_embd": hidden_size,
            "n_layer": num_layers,
            "n_head": num_heads,
            "n_positions": max_position_embeddings,
        },
        "gpt_neox": {},
        "deepseek_v3": {
            # Multi-latent attention expands K/V to every head: transformers repeats them by
            # heads / kv_heads, so kv_heads must equal heads (as in DeepSeek's own configs).
            "num_key_value_heads": num_heads,
            **experts,
            "n_routed_experts": 4,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "q_lora_rank": hidden_size // 2,
            "kv_lora_rank": hidden_size // 4,
            "qk_rope_head_dim": head_dim // 2,
            "qk_nope_head_dim": head_dim // 2,
            "v_head_dim": head_dim,
        },
        "glm4": {**gqa, "head_dim": head_dim},
        "olmo2": gqa,
        "granite": gqa,
    }
    if arch not in per_arch:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {list(TINY_FAMILIES)}")
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
