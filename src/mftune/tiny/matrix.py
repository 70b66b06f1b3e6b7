"""The model matrix: every family of `TINY_FAMILIES`, tiny and random, checked on the CPU through the paths
mftune trains and serves with (tests/test_model_matrix.py runs it; scripts/model_matrix.py writes
docs/models.md from it).

Per family: it loads through `from_pretrained` with no weight missing; the default LoRA targets adapt attention
and neither the output head nor a mixture-of-experts router; per-token losses of isolated packed rows
equal each sample's alone (which catches sliding windows, soft-capping and position handling under
packing); full fine-tuning and LoRA steps lower the loss (LoRA touching only adapters); the merged model's
logits equal base + adapter's; QLoRA loads and trains on the CPU where bitsandbytes allows; and greedy
generation of left-padded prompts in one batch equals each prompt's alone. A check that cannot pass is the reason a family is refused, not trained wrongly.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mftune.tiny.models import build_tiny_model

CHECKS = (
    "load",
    "lora_targets",
    "packed_equals_unpacked",
    "varlen_packed",
    "full_step",
    "lora_step",
    "merge",
    "qlora",
    "generate",
)
# The paths mftune declines, with a phrase of the reason it gives; every other check of every family passes.
# tests/test_model_matrix.py holds the run to this, and docs/models.md is written from the run.
EXPECTED_REFUSALS: dict[tuple[str, str], str] = {
    ("gemma2", "varlen_packed"): "soft-caps its attention logits",
    ("gemma3_text", "varlen_packed"): "sliding window",
    ("mistral", "varlen_packed"): "sliding window",
}
# Sample lengths: longer than the tiny sliding window (16), so a window that leaks across samples shows.
LENGTHS = ((20, 7, 25), (31, 12))
CHUNK = 512


def family_model(family: str, workdir: Path) -> Path:
    """The family's tiny model folder, built once under `workdir`."""
    folder = workdir / family
    if not (folder / "config.json").is_file():
        build_tiny_model(folder, family)  # type: ignore[arg-type]
    return folder


def _rows(seed: int = 0) -> list[list]:
    from mftune.data.collate import Sample

    rng = np.random.default_rng(seed)
    rows, sample_id = [], 0
    for lengths in LENGTHS:
        row = []
        for n in lengths:
            ids = rng.integers(10, 4000, n).astype(np.int32)
            row.append(Sample(ids, np.ones(n, dtype=bool), task_id=0, sample_id=sample_id))
            sample_id += 1
        rows.append(row)
    return rows


def _batch(rows) -> dict:
    from mftune.data.collate import collate_rows

    batch = collate_rows(rows, pad_id=0)
    batch["packed"] = any(len(row) > 1 for row in rows)
    return batch


class Refused(Exception):
    """mftune refuses this family for this path, with a one-line reason (not a failure)."""


def _load(folder: Path, method: str, attention: str = "auto", max_seq_len: int = 64, **lora):
    from mftune.config.schema import FinetuneConfig, LoraConfig, ModelConfig
    from mftune.model.load import load_model

    model_cfg = ModelConfig(name_or_path=str(folder), attention=attention, dtype="float32")
    finetune = FinetuneConfig(method=method, lora=LoraConfig(r=8, alpha=16, **lora))
    torch.manual_seed(0)
    return load_model(
        model_cfg, finetune, device=torch.device("cpu"), packing="isolated", max_seq_len=max_seq_len
    )


def _losses(model, batch) -> torch.Tensor:
    from mftune.train.step import token_losses

    return token_losses(model, batch, CHUNK).loss


def check_load(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if keys}
    assert not problems, f"weights not loaded: {problems}"


def check_lora_targets(folder: Path) -> None:
    model = _load(folder, "lora")
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert wrapped, "no layer was adapted"
    head = model.get_output_embeddings()
    assert not hasattr(head, "lora_A"), "the output head is adapted"
    # Routers are named `gate`, `router` or `shared_expert_gate` in every MoE family transformers has.
    routers = [n for n in wrapped if n.rsplit(".", 1)[-1] in ("gate", "router", "shared_expert_gate")]
    assert not routers, f"a mixture-of-experts router is adapted: {routers[:3]}"
    attention = [n for n in wrapped if any(part in n for part in ("attn", "attention"))]
    assert attention, f"no attention projection is adapted: {wrapped[:4]}"


def _alone(model, rows) -> torch.Tensor:
    return torch.cat([_losses(model, _batch([[s]])) for row in rows for s in row])


def check_packed_equals_unpacked(folder: Path) -> None:
    model = _load(folder, "full").eval()
    rows = _rows()
    with torch.no_grad():
        diff = float((_losses(model, _batch(rows)) - _alone(model, rows)).abs().max())
    assert diff < 1e-4, f"packed token losses differ from each sample's alone by {diff:.3g}"


def check_varlen_packed(folder: Path) -> None:
    """Packed rows through `mftune_varlen` (its reference kernel on the CPU) equal each sample alone."""
    rows = _rows()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reference kernel warns that it is slow
            varlen = _load(folder, "full", attention="varlen").eval()
            with torch.no_grad():
                packed = _losses(varlen, _batch(rows))
    except ValueError as err:
        if "varlen" in str(err):  # mftune's own refusal of a feature the backend lacks
            raise Refused(str(err)) from err
        raise
    with torch.no_grad():
        alone = _alone(_load(folder, "full").eval(), rows)
    diff = float((packed - alone).abs().max())
    assert diff < 1e-4, f"varlen packed token losses differ from each sample's alone by {diff:.3g}"


def _train(model, steps: int = 3) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch, losses = _batch(_rows(1)), []
    for _ in range(steps + 1):
        loss = _losses(model, batch).mean()
        losses.append(float(loss.detach()))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None), (
            "a gradient is not finite"
        )
        optimizer.step()
        optimizer.zero_grad()
    return losses


def check_full_step(folder: Path) -> None:
    losses = _train(_load(folder, "full").train())
    assert losses[-1] < losses[0], f"the loss did not fall: {losses}"


def check_lora_step(folder: Path) -> None:
    model = _load(folder, "lora").train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad), (
        "a non-adapter weight trains"
    )
    losses = _train(model)
    assert losses[-1] < losses[0], f"the loss did not fall: {losses}"
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert not changed, f"frozen weights changed: {changed[:3]}"


def check_merge(folder: Path) -> None:
    model = _load(folder, "lora").train()
    _train(model, steps=2)
    model.eval()
    ids = torch.randint(10, 4000, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = copy.deepcopy(model).merge_and_unload()(input_ids=ids).logits
    diff = float((adapted - merged).abs().max())
    assert diff < 1e-4, f"merged logits differ from base + adapter by {diff:.3g}"


def check_qlora(folder: Path) -> None:
    losses = _train(_load(folder, "qlora").train(), steps=1)
    assert all(np.isfinite(losses)), f"a QLoRA loss is not finite: {losses}"


def check_generate(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mftune.infer.generate import _left_padded, generation_kwargs

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs = generation_kwargs(model, tokenizer, max_new_tokens=6)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(10, 4000, (n,), generator=generator).tolist() for n in (5, 11)]

    def generate(batch: list[list[int]]) -> list[list[int]]:
        with _left_padded(tokenizer), torch.no_grad():
            inputs = tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
            out = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
        return [[t for t in row if t != tokenizer.pad_token_id] for row in out.tolist()]

    # Left padding shifts the short prompt: a family whose positions or mask ignore the padding differs.
    together, alone = generate(prompts), [generate([p])[0] for p in prompts]
    assert all(together), "nothing was generated"
    assert together == alone, f"batched generation differs from one prompt at a time: {together} vs {alone}"


RUNNERS: dict[str, Callable[[Path], None]] = {name: globals()[f"check_{name}"] for name in CHECKS}


def run_check(family: str, check: str, workdir: Path) -> tuple[str, str]:
    """(`ok` | `refused` | `skipped` | `failed`, the one-line reason) of one check of one family.

    `refused` is mftune declining a path for the family with its own message; `skipped` a package
    the check needs and this machine lacks; `failed` anything else, a bug to fix.
    """
    from mftune.config.errors import MissingPackageError

    try:
        RUNNERS[check](family_model(family, workdir))
    except Refused as err:
        return "refused", _one_line(err)
    except MissingPackageError as err:
        return "skipped", _one_line(err)
    except Exception as err:  # every failure becomes the family's row in docs/models.md
        return "failed", f"{type(err).__name__}: {_one_line(err)}"
    return "ok", ""


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:240] if text else type(err).__name__
