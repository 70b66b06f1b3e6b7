"""Run the model matrix (`mftune.tiny.matrix`) on the CPU, print it, and with --write rewrite docs/models.md.

    python scripts/model_matrix.py [--write] [--families llama qwen2 ...]

Every family of `TINY_FAMILIES` is built tiny and random (nothing is downloaded) and put through each
check; a row says which passed, which mftune refuses (and why), and which failed.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
MARK = {"ok": "✓", "refused": "refused", "skipped": "skipped", "failed": "FAILED"}
TABLE_START = "| family |"
TABLE_END = "## Refusals and failures"

INTRO = """# Model families

mftune is checked on a matrix of model families built from transformers' own configs, tiny (2 layers,
hidden size 64) and random, on the CPU; nothing is downloaded. `scripts/model_matrix.py --write`
rewrites this page from a run, and `tests/test_model_matrix.py` runs the same checks in CI.

| check | what passes |
|---|---|
| load | `from_pretrained` loads every weight, none missing or unexpected |
| lora_targets | the default LoRA targets (`finetune.lora.target_modules: auto`) adapt attention, never the output head or a mixture-of-experts router |
| packed_equals_unpacked | per-token losses of isolated packed rows (sdpa, or eager where the model has no sdpa) equal each sample's alone; samples are longer than the 16-token sliding window of the windowed families |
| varlen_packed | the same through `model.attention: varlen` (its reference kernel on the CPU) |
| full_step | full fine-tuning steps lower the loss, gradients finite |
| lora_step | LoRA steps lower the loss; only adapter weights train and the base is unchanged |
| merge | the merged model's logits equal base + adapter's (max abs difference < 1e-4) |
| qlora | 4-bit QLoRA loads through bitsandbytes' CPU backend and trains a step |
| generate | greedy generation of left-padded prompts in one batch equals each prompt's alone |

A refusal is mftune declining a path for a family with a one-line reason when the run starts or at the
first step that would need it, rather than training it wrongly; `model.attention: auto` never picks a
refused backend. MoE experts are fused 3-D parameters in transformers 5, not linear layers: LoRA adapts
attention and the dense or shared-expert MLPs of a mixture-of-experts model, and only full fine-tuning
trains its routed experts.

"""


def run(families: list[str], workdir: Path) -> dict[str, dict[str, tuple[str, str]]]:
    from mftune.tiny.matrix import CHECKS, run_check

    results = {}
    for family in families:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[family] = {check: run_check(family, check, workdir) for check in CHECKS}
        print(family, " ".join(f"{c}={s}" for c, (s, _) in results[family].items()), flush=True)
    return results


def render(results: dict[str, dict[str, tuple[str, str]]]) -> str:
    """The matrix table and the list of refusals and failures, as markdown."""
    from mftune.tiny.matrix import CHECKS

    lines = [TABLE_START + " " + " | ".join(CHECKS) + " |", "|---" * (len(CHECKS) + 1) + "|"]
    notes = []
    for family, row in results.items():
        lines.append(f"| {family} | " + " | ".join(MARK[row[c][0]] for c in CHECKS) + " |")
        notes += [
            f"- **{family}**, {check}, {status}: {reason}"
            for check, (status, reason) in row.items()
            if reason
        ]
    return "\n".join(lines) + "\n\n" + TABLE_END + "\n\n" + ("\n".join(notes) or "None.") + "\n"


def versions() -> str:
    import peft
    import torch
    import transformers

    today = datetime.date.today().isoformat()
    return (
        f"Last run {today} on the CPU with torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}.\n\n"
    )


def main(argv: list[str] | None = None) -> int:
    from mftune.tiny import TINY_FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/models.md from this run")
    parser.add_argument("--families", nargs="+", default=list(TINY_FAMILIES), choices=TINY_FAMILIES)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        results = run(args.families, Path(workdir))
    page = render(results)
    print("\n" + page)
    if args.write:
        DOCS.write_text(INTRO + versions() + page, encoding="utf-8")
        print(f"wrote {DOCS}")
    failed = [f for f, row in results.items() if any(s == "failed" for s, _ in row.values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
