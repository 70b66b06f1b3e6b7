"""Write a tiny random-weight causal LM (with the tiny tokenizer) for offline demos and tests.

python scripts/make_tiny_model.py runs/tiny-llama --arch llama
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mftune.tiny import TINY_FAMILIES, build_tiny_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the model into")
    parser.add_argument("--arch", choices=TINY_FAMILIES, default="llama")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder (default: the shipped one)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    args = parser.parse_args(argv)
    out = build_tiny_model(
        args.out,
        args.arch,
        tokenizer_dir=args.tokenizer,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
    )
    print(out)


if __name__ == "__main__":
    main()
