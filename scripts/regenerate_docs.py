"""Rewrite the generated parts of the docs: the config reference at the end of docs/config.md and the key
table of docs/mftcoder-compat.md. Tests check that both are current.

    python scripts/regenerate_docs.py
"""

from __future__ import annotations

from pathlib import Path

from mftune.config import config_reference_markdown
from mftune.config.mftcoder import mftcoder_reference_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def replace_between(path: Path, start: str, end: str | None, generated: str) -> None:
    """Replace the text from the line `start` up to the line `end` (or the end of the file)."""
    text = path.read_text(encoding="utf-8")
    begin = text.index(start)
    finish = text.index(end, begin) if end else len(text)
    path.write_text(text[:begin] + generated + ("\n" if end else "") + text[finish:], encoding="utf-8")


def main() -> None:
    replace_between(DOCS / "config.md", "### `model`", None, config_reference_markdown())
    replace_between(
        DOCS / "mftcoder-compat.md",
        "| MFTCoder key |",
        "## Deliberate differences",
        mftcoder_reference_markdown(),
    )
    print("docs/config.md and docs/mftcoder-compat.md regenerated")


if __name__ == "__main__":
    main()
