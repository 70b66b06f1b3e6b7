"""Write the example multi-task data: `examples/data/<task>/train.jsonl` and `examples/heldout/<task>.jsonl`.

Deterministic: the same `--seed` and `--scale` give byte-identical files.

    python scripts/make_example_data.py                       # regenerate the shipped examples
    python scripts/make_example_data.py --out /tmp/big --scale 10 --seed 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mftune.tiny.examples import DEFAULT_SEED, NUM_HELDOUT, write_examples

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "examples", help="root folder (default: examples/)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="global seed (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplier on every task's train size")
    parser.add_argument("--heldout", type=int, default=NUM_HELDOUT, help="held-out records per task")
    args = parser.parse_args(argv)
    for path in write_examples(args.out, seed=args.seed, scale=args.scale, num_heldout=args.heldout):
        with path.open(encoding="utf-8") as f:
            print(f"{sum(1 for _ in f):6d}  {path}")


if __name__ == "__main__":
    main()
