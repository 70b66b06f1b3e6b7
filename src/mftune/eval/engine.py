"""Generation engines for evaluation: transformers (default, any device) and vLLM (GPU, when installed).

Both take tokenized prompts, so the ids a model sees are the ones `prompt_ids` builds the way training
tokenized them, whichever engine runs.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mftune.config.errors import MissingPackageError
from mftune.infer.load import adapter_base, is_adapter_dir
from mftune.infer.vllm_lora import max_lora_rank, needs_merge


@dataclass(frozen=True)
class Sampling:
    """One task's generation settings."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int


class TransformersEngine:
    """Batched `model.generate` on a loaded model (`mftune.infer.generate.generate_from_ids`)."""

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[str]]:
        from mftune.infer.generate import generate_from_ids

        return generate_from_ids(
            self.model,
            self.tokenizer,
            prompts,
            num_samples=sampling.n,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            batch_size=self.batch_size,
            stop_strings=list(sampling.stop) or None,
            seed=sampling.seed,
        )


class VllmEngine:
    """vLLM on a model folder; an adapter is served through vLLM's LoRA support, or merged into a
    temporary folder first when it also trains whole modules (`modules_to_save`), which vLLM's LoRA
    cannot load."""

    name = "vllm"

    def __init__(self, model_dir: Path, stop_token_ids: list[int]):
        try:
            import vllm
        except ImportError:
            raise MissingPackageError(
                "eval.engine vllm needs vLLM (and a GPU): pip install vllm, or set eval.engine: transformers"
            ) from None
        self._vllm = vllm
        self.stop_token_ids = stop_token_ids
        self._tmp: Path | None = None
        self.lora = None
        if needs_merge(model_dir):
            from mftune.export.merge import merge_adapter

            self._tmp = Path(tempfile.mkdtemp(prefix="mftune-vllm-"))
            model_dir = merge_adapter(model_dir, self._tmp / "merged")
        if is_adapter_dir(model_dir):
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("mftune-adapter", 1, str(model_dir))
            self.llm = vllm.LLM(
                model=adapter_base(model_dir),
                tokenizer=str(model_dir),
                enable_lora=True,
                max_lora_rank=max_lora_rank(model_dir),
            )
        else:
            self.llm = vllm.LLM(model=str(model_dir))

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[str]]:
        params = self._vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=self.stop_token_ids,
            seed=sampling.seed,
            include_stop_str_in_output=True,
        )
        inputs = [{"prompt_token_ids": ids} for ids in prompts]
        outputs = self.llm.generate(inputs, params, lora_request=self.lora, use_tqdm=False)
        return [[choice.text for choice in out.outputs] for out in outputs]

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
