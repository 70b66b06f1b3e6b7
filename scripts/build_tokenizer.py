"""Rebuild the tiny byte-level BPE tokenizer into `assets/tokenizer/` and the package copy.

Deterministic: re-running it rewrites byte-identical files (a test checks this).

    python scripts/build_tokenizer.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mftune.tiny import build_tokenizer, tokenizer_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        nargs="*",
        default=[REPO_ROOT / "assets" / "tokenizer", tokenizer_path()],
        help="folders to write (default: assets/tokenizer and src/mftune/tiny/assets/tokenizer)",
    )
    for out_dir in parser.parse_args(argv).out:
        for path in sorted(build_tokenizer(out_dir).iterdir()):
            print(f"{path.stat().st_size:8d}  {path}")


if __name__ == "__main__":
    main()
