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

    train = commands.add_parser(
        "train", help="fine-tune a model on the config's tasks (here or under accelerate)"
    )
    _config_args(train)
    _launch_args(commands)

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
    inspect.add_argument(
        "--dump-rows",
        metavar="FILE.jsonl",
        help="write the packed training rows of an epoch: ids, labels and each piece's sample and source",
    )
    inspect.add_argument("--epoch", type=int, default=0, help="the epoch --dump-rows writes (default 0)")
    inspect.add_argument("--color", choices=("auto", "always", "never"), default="auto")

    merge = commands.add_parser("merge", help="fold a trained adapter into its base model")
    merge.add_argument("model", metavar="RUN_OR_ADAPTER", help="adapter folder, or a run folder with final/")
    merge.add_argument("--out", required=True, metavar="DIR", help="folder to write the merged model to")
    merge.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    merge.add_argument("--base", help="base model to merge into (default: the adapter's own)")
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that is not empty (never the adapter's own)",
    )

    generate = commands.add_parser("generate", help="answer every record of a jsonl file")
    generate.add_argument("model", help="model, adapter or run folder")
    generate.add_argument("--input", required=True, metavar="F.jsonl", help="records with messages or prompt")
    generate.add_argument("--output", required=True, metavar="G.jsonl", help="records plus 'output'")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")

    _eval_args(commands)
    _serve_args(commands)

    chat = commands.add_parser("chat", help="chat with a trained model in the terminal")
    chat.add_argument("model", help="model, adapter or run folder")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    return parser


def _eval_args(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="score a run, checkpoint or model per task: loss, exact match, pass@k in a sandbox"
    )
    evaluate.add_argument(
        "overrides",
        nargs="*",
        metavar="TARGET [CONFIG] [key.path=value ...]",
        help="a run folder, a checkpoint or a model folder; a config whose eval section to use; overrides",
    )
    evaluate.add_argument("--benchmark", choices=("humaneval",), help="evaluate a built-in benchmark only")
    evaluate.add_argument(
        "--dry-run",
        type=int,
        nargs="?",
        const=3,
        metavar="N",
        help="print N prompts per task (default 3), generate nothing",
    )
    evaluate.add_argument("--out", metavar="DIR", help="where results go (default: TARGET/eval)")
    evaluate.add_argument("--workers", type=int, help="programs run at once (eval.sandbox.workers)")
    evaluate.add_argument("--show", type=int, default=0, metavar="N", help="print N sample rows per task")
    evaluate.add_argument("--limit", type=int, metavar="N", help="only the first N problems of every task")
    evaluate.add_argument(
        "--samples",
        metavar="FILE.jsonl",
        help="score completions made elsewhere ({task_id, completion} lines)",
    )
    evaluate.add_argument("--problems", metavar="humaneval|FILE", help="the problems --samples answer")
    evaluate.add_argument("--k", default="1", help="pass@k values for --samples, comma-separated (default 1)")


def _serve_args(commands) -> None:
    serve = commands.add_parser("serve", help="serve a run or model through an OpenAI-compatible API")
    serve.add_argument("target", metavar="TARGET", help="a run folder, a checkpoint or a model folder")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key", help="required from clients as 'Authorization: Bearer KEY' (or MFTUNE_API_KEY)"
    )
    serve.add_argument("--engine", choices=("auto", "transformers", "vllm"), default="auto",
                       help="auto: vLLM when installed and a GPU is present, else the embedded engine")  # fmt: skip
    serve.add_argument(
        "--max-concurrency", type=int, default=16, metavar="N", help="sequences generated at once"
    )
    serve.add_argument("--model-name", help="the name clients ask for (default: the folder's name)")
    serve.add_argument(
        "--max-tokens", type=int, default=4096, metavar="N", help="the largest max_tokens a request may ask"
    )
    serve.add_argument("--max-n", type=int, default=8, metavar="N", help="the largest n a request may ask")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                       help="how long a batch waits for more requests to join it (embedded engine)")  # fmt: skip
    serve.add_argument(
        "--grace-seconds", type=int, default=30, help="on SIGTERM, time left to requests in flight"
    )
    serve.add_argument("--device", help="embedded engine: cpu, cuda, cuda:1 ... (default: CUDA when present)")


def _launch_args(commands) -> None:
    from mftune.train.launch import NAMED_CONFIGS

    launch = commands.add_parser(
        "launch", help="run `train` on many GPUs or machines through `accelerate launch`"
    )
    _config_args(launch)
    launch.add_argument(
        "--accelerate",
        required=True,
        metavar="NAME|FILE",
        help=f"a shipped accelerate config ({', '.join(NAMED_CONFIGS)}) or an accelerate config file",
    )
    launch.add_argument(
        "--num-processes",
        type=int,
        help="processes over all machines (default: every GPU of every machine; 1 without GPUs)",
    )
    launch.add_argument("--num-machines", type=int, default=1, help="machines (default 1)")
    launch.add_argument("--machine-rank", type=int, default=0, help="this machine's index (default 0)")
    launch.add_argument("--main-process-ip", help="address of machine 0 (several machines)")
    launch.add_argument("--main-process-port", type=int, help="rendezvous port on machine 0 (default 29500)")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML or JSON config (mftune's, or an MFTCoder train config)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    from mftune.config import ConfigError

    handlers = {
        ("train", None): _train,
        ("launch", None): _launch,
        ("data", "validate"): _data_validate,
        ("data", "inspect"): _data_inspect,
        ("merge", None): _merge,
        ("generate", None): _generate,
        ("chat", None): _chat,
        ("eval", None): _eval,
        ("serve", None): _serve,
    }
    from mftune.config.errors import MissingPackageError

    key = (args.command, getattr(args, "data_command", None))
    try:
        return handlers[key](args)
    except (ConfigError, FileNotFoundError, MissingPackageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse `argv`; `key.path=value` overrides may also follow options (`CONFIG --opt x a.b=1`)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _train(args) -> int:
    from mftune.config import load_config
    from mftune.data.pipeline import DataValidationError
    from mftune.train.loop import train

    cfg = load_config(args.config, args.overrides)
    try:
        final = train(cfg)
    except DataValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"done: {final}")
    return 0


def _launch(args) -> int:
    from mftune.train.launch import LaunchError, Topology, launch

    topology = Topology(
        num_processes=args.num_processes,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        main_process_ip=args.main_process_ip,
        main_process_port=args.main_process_port,
    )
    try:
        return launch(args.config, args.overrides, args.accelerate, topology)
    except LaunchError as e:
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
    if errors:
        print(f"\n{len(errors)} bad record(s):", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        if cfg.data.on_error == "skip":
            print("data.on_error is 'skip': training skips them (counted above)", file=sys.stderr)
    else:
        print("\nno errors")
    empty = [t.name for t in data.tasks if len(t.train) == 0]
    if empty:
        print(f"error: no training sample left in task(s) {', '.join(empty)}", file=sys.stderr)
    return 1 if empty or (errors and cfg.data.on_error == "fail") else 0


def _data_inspect(args) -> int:
    from mftune.data.inspect import dump_rows, dump_samples, highlight
    from mftune.data.pipeline import padding_id

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
    if args.dump_rows:
        pad_id = padding_id(tokenizer)
        count = dump_rows(data, args.dump_rows, args.epoch, pad_id)
        print(f"wrote {count} rows of epoch {args.epoch} (packing {data.packing}) to {args.dump_rows}")
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


def _merge(args) -> int:
    from mftune.export.merge import merge_adapter

    try:
        out = merge_adapter(args.model, args.out, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    except ValueError as e:  # an adapter that names no base, an output folder that is not free
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


def _generate(args) -> int:
    from mftune.infer.generate import generate_file

    try:
        count = generate_file(
            args.model,
            args.input,
            args.output,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            temperature=args.temperature,
        )
    except ValueError as e:  # a bad input record, named by file and line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} outputs to {args.output}")
    return 0


def _eval(args) -> int:
    from mftune.eval.command import main as eval_main

    return eval_main(args)


def _serve(args) -> int:
    from mftune.serve.command import main as serve_main

    return serve_main(args)


def _chat(args) -> int:
    from mftune.infer.chat import chat_loop

    chat_loop(args.model, system=args.system, max_new_tokens=args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
