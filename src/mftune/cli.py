"""The `mftune` command: one entry point, one function per subcommand, heavy imports deferred."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mftune", description="Multi-task fine-tuning of causal language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="check and look at the training data").add_subparsers(
        dest="data_command", required=True
    )
    validate = data.add_parser(
        "validate", help="parse, render and tokenize every record; print a per-task table"
    )
    _config_args(validate)
    inspect = data.add_parser("inspect", help="show a sample with its trained tokens marked, or dump samples")
    _config_args(inspect)
    inspect.add_argument("--task", help="task name (default: the first task; with --dump: every task)")
    inspect.add_argument("--index", type=int, default=0, help="sample index within the task (default 0)")
    inspect.add_argument(
        "--dump", metavar="FILE.jsonl", help="write task, input_ids, labels, text per sample"
    )
    inspect.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML or JSON config (mftune's, or an MFTCoder train config)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mftune.config import ConfigError

    handlers = {("data", "validate"): _data_validate, ("data", "inspect"): _data_inspect}
    key = (args.command, getattr(args, "data_command", None))
    try:
        return handlers[key](args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _load_data(args, *, raise_on_errors: bool):
    from mftune.config import load_config
    from mftune.data.pipeline import load_tokenizer, prepare_data

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model)
    return cfg, tokenizer, prepare_data(cfg, tokenizer, raise_on_errors=raise_on_errors)


def _data_validate(args) -> int:
    from mftune.data.report import format_table, task_rows

    cfg, _, data = _load_data(args, raise_on_errors=False)
    print(format_table(task_rows(data)))
    cached = [t.name for t in data.tasks if t.from_cache]
    if cached:
        print(f"\nfrom cache ({cfg.data.cache_dir}): {', '.join(cached)}")
    errors = data.errors()
    if not errors:
        print("\nno errors")
        return 0
    print(f"\n{len(errors)} bad record(s):", file=sys.stderr)
    for error in errors:
        print(f"  {error}", file=sys.stderr)
    if cfg.data.on_error == "skip":
        print("data.on_error is 'skip': training skips them (counted above)", file=sys.stderr)
        return 0
    return 1


def _data_inspect(args) -> int:
    from mftune.data.inspect import dump_samples, highlight

    _cfg, tokenizer, data = _load_data(args, raise_on_errors=False)
    by_name = {t.name: t for t in data.tasks}
    if args.task is not None and args.task not in by_name:
        print(f"error: no task '{args.task}' (tasks: {', '.join(by_name)})", file=sys.stderr)
        return 2
    if args.dump:
        chosen = [by_name[args.task]] if args.task else data.tasks
        count = dump_samples(tokenizer, [t.tokenized for t in chosen], args.dump)
        print(f"wrote {count} samples to {args.dump}")
        return 0
    task = by_name[args.task] if args.task else data.tasks[0]
    if not 0 <= args.index < len(task.tokenized):
        print(f"error: --index must be in [0, {len(task.tokenized)}) for task '{task.name}'", file=sys.stderr)
        return 2
    ids, trained = task.tokenized.sample(args.index)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(f"task {task.name}, sample {args.index} ({task.tokenized.source(args.index)})")
    print(f"{len(ids)} tokens, {int(trained.sum())} trained (marked {'in green' if color else 'with ⟦ ⟧'})\n")
    print(highlight(tokenizer, ids, trained, color=color))
    return 0


if __name__ == "__main__":
    sys.exit(main())
