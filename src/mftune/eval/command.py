"""`mftune eval`: read the command line into a target and an eval section, then run or score samples.

    mftune eval TARGET [CONFIG] [key=value ...] [--benchmark humaneval] [--dry-run [N]] [--out DIR]
    mftune eval --samples FILE.jsonl --problems humaneval|FILE [--k 1,10]

The eval section comes from CONFIG when given, else from the run's resolved_config.yaml when TARGET
belongs to a run, else from `eval.*` overrides alone (a bare model folder). Validation losses come from
the run's data (or CONFIG's, for a model folder). Every failure the user can fix
is one line (several for several bad records), exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def main(args) -> int:
    """Run `mftune eval` from parsed arguments; the exit status."""
    from mftune.config import ConfigError
    from mftune.config.errors import MissingPackageError
    from mftune.data.pipeline import DataValidationError
    from mftune.eval.problems import ProblemError
    from mftune.eval.sandbox import SandboxError
    from mftune.eval.target import TargetError

    try:
        if args.samples or args.problems:
            return _score_samples(args)
        return _evaluate(args)
    except (
        ConfigError,
        TargetError,
        ProblemError,
        SandboxError,
        MissingPackageError,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _evaluate(args) -> int:
    from mftune.eval.run import dry_run, run_eval
    from mftune.eval.target import TargetError, resolve_target

    if not args.overrides or "=" in args.overrides[0]:
        raise TargetError("mftune eval needs a TARGET: a run folder, a checkpoint or a model folder")
    target = resolve_target(args.overrides[0])
    rest = args.overrides[1:]
    config_path = rest.pop(0) if rest and rest[0].endswith(CONFIG_SUFFIXES) else None
    if any("=" not in item for item in rest):
        bad = next(item for item in rest if "=" not in item)
        raise TargetError(
            f"{bad!r} is neither a CONFIG file ({', '.join(CONFIG_SUFFIXES)}) nor a key=value override"
        )
    overrides = [*rest, *_flag_overrides(args)]
    run_cfg, eval_cfg = _configs(target, config_path, overrides)
    if args.benchmark:  # the benchmark alone, with its settings from the config when it has them
        task = eval_cfg.tasks.get(args.benchmark) or _benchmark_task(args.benchmark)
        eval_cfg = eval_cfg.model_copy(update={"tasks": {args.benchmark: task}})
    if args.limit:
        tasks = {name: t.model_copy(update={"limit": args.limit}) for name, t in eval_cfg.tasks.items()}
        eval_cfg = eval_cfg.model_copy(update={"tasks": tasks})
    if not eval_cfg.tasks and not (eval_cfg.loss and run_cfg is not None):
        raise TargetError(
            "nothing to evaluate: give --benchmark humaneval, eval.tasks in a CONFIG, or a run (for its losses)"
        )
    if args.dry_run is not None:
        dry_run(target, eval_cfg, run_cfg, args.dry_run)
        return 0
    out_dir = Path(args.out or eval_cfg.output_dir or target.default_out)
    run_eval(target, eval_cfg, run_cfg, out_dir, show=args.show)
    return 0


def _flag_overrides(args) -> list[str]:
    return [f"eval.sandbox.workers={args.workers}"] if args.workers else []


def _configs(target, config_path: str | None, overrides: list[str]):
    """(the `Config` whose data gives the validation losses, or None; the eval section).

    A run's own resolved config always describes its model and data; a CONFIG given with it contributes
    its eval section. With a bare model folder, CONFIG (if any) supplies both. A CONFIG that holds only
    an `eval:` section (examples/eval/code.yaml) is read on its own.
    """
    from mftune.config import load_config
    from mftune.config.load import eval_config_from_overrides, is_eval_only

    run_config = target.run_config
    if config_path is not None and is_eval_only(config_path):
        eval_cfg = eval_config_from_overrides([o for o in overrides if o.startswith("eval.")], config_path)
        if run_config is None:
            return None, eval_cfg
        run_overrides = [o for o in overrides if not o.startswith("eval.")]
        return load_config(run_config, run_overrides).model_copy(update={"eval": eval_cfg}), eval_cfg
    if run_config is None:
        if config_path is None:
            return None, eval_config_from_overrides(overrides)
        cfg = load_config(config_path, overrides)
        return cfg, cfg.eval
    if config_path is None:
        cfg = load_config(run_config, overrides)
        return cfg, cfg.eval
    eval_cfg = load_config(config_path, overrides).eval
    return load_config(run_config).model_copy(update={"eval": eval_cfg}), eval_cfg


def _benchmark_task(name: str):
    from mftune.config.eval_schema import EvalTaskConfig

    return EvalTaskConfig(benchmark=name)


def _score_samples(args) -> int:
    """pass@k of completions made elsewhere (HumanEval's `{task_id, completion}` lines), no model loaded."""
    from mftune.config.eval_schema import SandboxConfig
    from mftune.eval.benchmarks import benchmark_file
    from mftune.eval.problems import read_problems
    from mftune.eval.report import print_table, write_results
    from mftune.eval.sandbox import Sandbox
    from mftune.eval.scoring import score_samples
    from mftune.eval.target import TargetError

    if not (args.samples and args.problems):
        raise TargetError(
            "--samples and --problems go together: mftune eval --samples FILE --problems humaneval|FILE"
        )
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        raise TargetError(f"--k {args.k!r}: expected comma-separated integers such as 1,10") from None
    if min(ks) < 1:
        raise TargetError(f"--k {args.k!r}: every k must be at least 1")
    name = args.problems if args.problems == "humaneval" else Path(args.problems).stem
    path = benchmark_file("humaneval") if args.problems == "humaneval" else Path(args.problems)
    problems = read_problems(name, path)
    samples = _read_samples(Path(args.samples))
    sandbox = Sandbox(SandboxConfig(workers=args.workers or 2))
    scores = score_samples(problems, samples, ks, sandbox)
    out_dir = Path(args.out or Path(args.samples).with_suffix("").as_posix() + "-eval")
    header = {"samples": args.samples, "problems": args.problems, "sandbox": sandbox.isolation.as_dict()}
    results = write_results(out_dir, {name: scores}, {}, header)
    print_table(results["tasks"])
    missing = len(problems) - results["tasks"][name][f"pass@{ks[0]}"]["count"]
    if missing:
        print(
            f"note: {missing} of {len(problems)} problems have no sample and are not counted", file=sys.stderr
        )
    print(f"results: {out_dir / 'results.json'}  samples: {out_dir / 'samples.jsonl'}")
    return 0


def _read_samples(path: Path) -> list[tuple[str, str, str]]:
    from mftune.data.reader import DataError
    from mftune.eval.problems import ProblemError

    if not path.is_file():
        raise FileNotFoundError(f"--samples {path} does not exist")
    samples, errors = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(DataError(str(path), number, None, f"invalid JSON: {e.msg}"))
                continue
            for key in ("task_id", "completion"):
                if not isinstance(record, dict) or not isinstance(record.get(key), str):
                    errors.append(DataError(str(path), number, key, "missing or not a string"))
                    break
            else:
                samples.append((record["task_id"], record["completion"], f"{path}:{number}"))
    if errors:
        raise ProblemError(errors)
    if not samples:
        raise FileNotFoundError(f"--samples {path} holds no samples")
    return samples
