"""Refuse staged files over a size limit, so model weights and big data never enter git."""

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-kb", type=int, default=2048)
    parser.add_argument("files", nargs="*")
    args = parser.parse_args()
    too_big = [f for f in args.files if os.path.isfile(f) and os.path.getsize(f) > args.max_kb * 1024]
    for f in too_big:
        print(f"{f}: {os.path.getsize(f) // 1024} KB > {args.max_kb} KB", file=sys.stderr)
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
