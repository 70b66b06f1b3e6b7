"""Training throughput on one GPU: mftune against TRL's SFTTrainer and a plain transformers + peft loop.

Everything runs in one command, on the same synthetic chat data and the same random-weight models:

- data: one user turn and one assistant turn per sample, lognormal lengths (median 350 tokens, clipped to
  [32, max length]), written as a `messages` jsonl and tokenized once by mftune's own pipeline; TRL and the
  plain loop get exactly those token ids and labels (trained = mftune's assistant span);
- models: Qwen2.5-0.5B, -1.5B and -7B shapes built from a transformers config on the GPU (random weights,
  no download), saved once per shape in bf16; QLoRA loads that folder quantised (4-bit NF4);
- sides: mftune (`mftune.config.load_config` + `mftune.train.loop.train`, as `mftune train` runs it), TRL's
  `SFTTrainer` (pre-tokenized `datasets.Dataset`, packing), and the plain loop (padded batches of 8, sdpa,
  the model's own loss); each at its default settings (gradient checkpointing on) and at its fastest
  (checkpointing off; TRL with liger-kernel and flash-attn when installed; the micro-batch that runs fastest);
- every (shape, method, side, setting) in its own subprocess: fresh CUDA memory statistics, and an
  out-of-memory case is recorded as OOM while the run goes on.

It prints real (non-padding) input tokens per second over the timed steps, MFU, peak GPU memory and the
mftune/TRL ratios, and writes every number to a JSON file. The FLOP count behind MFU is printed with the
table; docs/performance.md explains it.

    python benchmarks/throughput.py --out throughput.json                  # the whole grid, H100 80GB
    python benchmarks/throughput.py --shapes 0.5b --methods lora --steps 10
    python benchmarks/throughput.py --smoke                                # CPU, tiny model, seconds

Which cases run is planned in benchmarks/throughput_plan.py, what each side runs is in
benchmarks/throughput_sides.py, and the data and FLOPs in benchmarks/workload.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import util
from pathlib import Path

from benchlib import (
    add_run_flags,
    in_workdir,
    log_tail,
    markdown_table,
    on_off,
    run_logged,
    versions,
    write_json,
)
from throughput_plan import (
    METHODS,
    SETTINGS,
    SIDES,
    Case,
    attention_setting,
    micro_batch_candidates,
    plan_cases,
    side_sizes,
)
from throughput_sides import build_model
from workload import (
    GPU_SHAPES,
    MFU_FORMULA,
    SHAPES,
    Profile,
    build_corpus,
    flops_per_token,
    model_counts,
    profile_from,
    summarise,
)

SIDES_SCRIPT = Path(__file__).resolve().parent / "throughput_sides.py"
# Outcomes that do not fail the run: a case that ran out of memory, or that the time budget skipped or stopped.
NOT_FAILURES = ("ok", "OOM", "skipped", "out_of_time")
PACKAGES = (
    "mftune", "torch", "transformers", "peft", "accelerate", "trl", "datasets", "liger-kernel", "flash-attn",
    "bitsandbytes",
)  # fmt: skip


@dataclass
class Runner:
    """Runs case subprocesses in `workdir` and keeps their results."""

    workdir: Path
    profile: Profile
    args: argparse.Namespace
    results: list[dict] = field(default_factory=list)

    def out_of_time(self, case: Case) -> dict | None:
        """A `skipped` result if the case would not finish within the time left, else None.

        A case is expected to take as long as the longest one of its shape so far (the same model
        loads, the same steps), or `--case-estimate` seconds for the first of a shape.
        """
        walls = [r.get("wall_seconds", 0) for r in self.results if r["shape"] == case.shape]
        needed = max(walls, default=self.args.case_estimate)
        if self.args.deadline.left() >= needed:
            return None
        left = max(self.args.deadline.left(), 0)
        return {
            **asdict(case),
            "status": "skipped",
            "error": f"time budget: {left:.0f} s left, ~{needed:.0f} s needed",
        }

    def subprocess(self, kind: str, spec: dict, name: str) -> dict:
        """Run `throughput_sides.py KIND spec.json`; its result, or a status saying why there is none.

        It is stopped at `--case-timeout` (status `timeout`) or when the time budget runs out
        (`out_of_time`), whichever comes first.
        """
        for folder in ("specs", "results"):
            (self.workdir / folder).mkdir(exist_ok=True)
        spec_path = self.workdir / "specs" / f"{name}.json"
        result_path = self.workdir / "results" / f"{name}.json"
        result_path.unlink(missing_ok=True)
        spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}, indent=1))
        log = self.workdir / "logs" / f"{name}.log"
        budget_binds = self.args.deadline.binds(self.args.case_timeout)
        argv = [sys.executable, str(SIDES_SCRIPT), kind, str(spec_path)]
        timeout = self.args.deadline.timeout(self.args.case_timeout)
        status, _ = run_logged(argv, log, timeout=timeout, threads=self.args.threads)
        if status is None and budget_binds:
            return {"status": "out_of_time", "error": f"stopped at the time budget; log: {log}"}
        if status is None:
            return {"status": "timeout", "error": f"over {self.args.case_timeout} s; log: {log}"}
        if result_path.exists():
            return json.loads(result_path.read_text())
        tail = log_tail(log).splitlines()
        if any("out of memory" in line.lower() for line in tail):
            return {"status": "OOM", "error": tail[-1]}
        print("\n".join(tail), file=sys.stderr)
        return {"status": "error", "error": tail[-1] if tail else "no output", "log": str(log)}

    def model(self, shape_name: str, shape: dict) -> tuple[Path, str] | None:
        """A saved random-weight model of the shape and the device's name; None if time ran out."""
        model_dir = self.workdir / "models" / shape_name
        spec = {
            "shape": shape,
            "model_dir": str(model_dir),
            "tokenizer_dir": str(self.workdir / "tokenizer"),
            "device": self.profile.device,
            "dtype": self.profile.dtype,
        }
        if self.profile.device == "cuda":  # the parent never touches the GPU: its memory stays the cases'
            result = self.subprocess("model", spec, f"model-{shape_name}")
        else:
            result = build_model(spec)
        if result.get("status") == "out_of_time":
            return None
        if "device_name" not in result:
            raise SystemExit(f"could not build the {shape_name} model: {result.get('error')}")
        return model_dir, result["device_name"]

    def measure(self, case: Case, model_dir: Path, micro: int, steps: int, tag: str) -> dict:
        """One run of a case at one micro-batch size; the result summarised over its timed steps."""
        name = f"{case.name}-mb{micro}{tag}"
        profile = Profile(**{**asdict(self.profile), "steps": steps})
        spec = {
            **asdict(case),
            "profile": asdict(profile),
            "workdir": str(self.workdir),
            "model_dir": str(model_dir),
            "run_dir": str(self.workdir / "runs" / name),
            "micro_batch": micro,
            "attention": attention_setting(case, self.args),
        }
        started = time.perf_counter()
        raw = self.subprocess("case", spec, name)
        result = {**asdict(case), "micro_batch": micro, **summarise(raw, profile)}
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        return result

    def run(self, case: Case, model_dir: Path) -> dict:
        """Measure a case: the first micro-batch that fits (default), or the fastest that fits (fastest).

        A fastest search times `--probe-steps` steps at each size, then measures the fastest in full.
        A TRL case without trl installed, or one that would not fit in the time budget, is skipped.
        """
        if case.side == "trl" and not (util.find_spec("trl") and util.find_spec("datasets")):
            return {**asdict(case), "status": "skipped", "error": "trl or datasets not installed"}
        if skipped := self.out_of_time(case):
            return skipped
        candidates = micro_batch_candidates(
            case, self.profile, self.args.micro_batches, self.args.fastest_micro
        )
        search = case.setting == "fastest" and len(candidates) > 1
        tried: list[dict] = []
        for micro in candidates:
            steps = self.args.probe_steps if search else self.profile.steps
            result = self.measure(case, model_dir, micro, steps, "-probe" if search else "")
            tried.append(result)
            if result["status"] == "ok" and not search:
                break
        fitting = [r for r in tried if r["status"] == "ok"]
        if search and fitting:
            best = max(fitting, key=lambda r: r["tps"])
            final = self.measure(case, model_dir, best["micro_batch"], self.profile.steps, "")
        elif fitting:
            final = fitting[0]
        elif tried:
            final = tried[-1]
        else:
            final = {**asdict(case), "status": "skipped", "error": "no micro-batch size divides the step"}
        final["tried"] = [{k: r.get(k) for k in ("micro_batch", "status", "tps")} for r in tried]
        return final


def add_mfu_and_ratios(results: list[dict], flops: dict[tuple[str, str], float], peak_tflops: float) -> None:
    """MFU of every measured case, and on mftune rows the speed and memory ratios against TRL."""
    for r in results:
        r["flops_per_token"] = flops[r["shape"], r["method"]]
        if r["status"] == "ok":
            r["mfu"] = r["tps"] * r["flops_per_token"] / (peak_tflops * 1e12)
    trl = {(r["shape"], r["method"], r["setting"]): r for r in results if r["side"] == "trl"}
    for r in results:
        other = trl.get((r["shape"], r["method"], r["setting"]), {"status": "absent"})
        if r["side"] != "mftune" or not r["status"] == other["status"] == "ok":
            continue
        r["speed_vs_trl"] = r["tps"] / other["tps"]
        if r.get("peak_gib") and other.get("peak_gib"):
            r["memory_vs_trl"] = r["peak_gib"] / other["peak_gib"]


def table(results: list[dict]) -> str:
    """The results as a markdown table, one row per case."""
    header = ["shape", "method", "setting", "side", "attention", "ckpt", "micro x acc", "tok/s", "MFU"]
    header += ["peak GiB", "mftune/TRL tok/s", "mftune/TRL memory"]
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        cells = [r["shape"], r["method"], r["setting"], r["side"]]
        cells += [str(r.get("attention", "-")), on_off(r.get("gradient_checkpointing"))]
        cells.append(f"{r['micro_batch']} x {r['accumulation']}" if ok else "-")
        cells.append(f"{r['tps']:,.0f}" if ok else r["status"])
        cells.append(f"{r['mfu']:.1%}" if ok else "-")
        cells.append(f"{r['peak_gib']:.1f}" if ok and r.get("peak_gib") is not None else "-")
        cells.append(f"{r['speed_vs_trl']:.2f}" if "speed_vs_trl" in r else "-")
        cells.append(f"{r['memory_vs_trl']:.2f}" if "memory_vs_trl" in r else "-")
        rows.append(cells)
    return markdown_table(header, rows, right=range(7, 12))


def run(args: argparse.Namespace, profile: Profile, workdir: Path) -> int:
    """Data, then shape by shape: build the model, run its cases; the JSON is rewritten after each case.

    Returns:
        The exit status: 1 if a case failed other than by running out of memory or of time, else 0.
    """
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions(PACKAGES).items() if v))
    corpus = build_corpus(workdir, profile, args.seed)
    print(
        f"data: {corpus['samples']} samples, {corpus['tokens']:,} tokens, median {corpus['median_len']:.0f}, "
        f"mean {corpus['mean_len']:.0f}, max {corpus['max_len']} tokens ({corpus['dropped_overlong']} over "
        f"{profile.max_len} dropped), {corpus['trained_share']:.0%} trained (assistant turns); "
        f"{profile.rows_per_step} rows of {profile.max_len} per step ({profile.tokens_per_step:,} tokens), "
        f"{profile.warmup_steps} warm-up + {profile.steps} timed steps",
        flush=True,
    )
    runner = Runner(workdir, profile, args)
    cases, flops = plan_cases(args), {}
    report = {
        "command": shlex.join(sys.argv),
        "device": None,
        "versions": versions(PACKAGES),
        "profile": asdict(profile),
        "peak_tflops": args.peak_tflops,
        "time_budget": args.time_budget,
        "mfu_formula": MFU_FORMULA,
        "data": corpus,
        "models": {},
        "results": runner.results,
    }
    for shape_name in dict.fromkeys(c.shape for c in cases):
        counts = report["models"][shape_name] = model_counts(SHAPES[shape_name])
        for method in METHODS:
            flops[shape_name, method] = flops_per_token(counts, method, corpus["attention_len"])
        shape_cases = [c for c in cases if c.shape == shape_name]
        built = None if runner.out_of_time(shape_cases[0]) else runner.model(shape_name, SHAPES[shape_name])
        if built is None:
            print(f"model {shape_name}: not built, the time budget has run out", flush=True)
        else:
            model_dir, report["device"] = built
            print(f"model {shape_name}: {counts['total'] / 1e9:.2f}B parameters on {built[1]}", flush=True)
        for case in shape_cases:
            if built:
                result = runner.run(case, model_dir)
            else:
                result = {
                    **asdict(case),
                    "status": "skipped",
                    "error": "time budget: no time to build the model",
                }
            runner.results.append(result)
            done = f"{result['tps']:,.0f} tok/s" if result["status"] == "ok" else result["status"]
            print(f"  {case.name}: {done} ({result.get('wall_seconds', 0)} s)", flush=True)
            add_mfu_and_ratios(runner.results, flops, args.peak_tflops)
            write_json(args.out, report)
        shutil.rmtree(runner.workdir / "models" / shape_name, ignore_errors=True)
    print(f"\ndevice: {report['device']}; peak {args.peak_tflops:g} TFLOP/s\n")
    print(table(runner.results))
    print(f"\ntok/s: real (non-padding) input tokens per second over the timed steps. {MFU_FORMULA}")
    print(f"results: {args.out}")
    return int(any(r["status"] not in NOT_FAILURES for r in runner.results))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=GPU_SHAPES, default=list(GPU_SHAPES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all (smoke: full lora)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, help="default: all (smoke: trl if installed)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--steps", type=int, help="timed optimizer steps per case (default 20; smoke 2)")
    parser.add_argument("--warmup-steps", type=int, help="untimed optimizer steps first (default 3; smoke 1)")
    parser.add_argument(
        "--probe-steps", type=int, default=3, help="timed steps of each micro-batch tried by a fastest search"
    )
    parser.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step (default 32768)")
    parser.add_argument("--max-len", type=int, help="packed row and longest sample, in tokens (default 4096)")
    parser.add_argument("--median-len", type=int, help="median sample length in tokens (default 350)")
    parser.add_argument(
        "--micro-batches",
        nargs="+",
        type=int,
        help="micro-batch sizes (rows) a fastest setting tries; default: the rows of a step, halved down to 1",
    )
    parser.add_argument(
        "--fastest-micro",
        nargs="+",
        default=[],
        metavar="SIDE=N",
        help="a side's micro-batch size at its fastest setting, without a search (e.g. mftune=4 trl=1)",
    )
    parser.add_argument(
        "--mftune-attention", default="auto", help="mftune's model.attention in every case (default auto)"
    )
    parser.add_argument(
        "--trl-attention",
        default="auto",
        help="TRL's attn_implementation at its fastest; auto: flash_attention_2 if flash-attn is installed, "
        "else transformers' default (sdpa)",
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    add_run_flags(parser, out="throughput.json")
    parser.add_argument(
        "--case-estimate",
        type=float,
        help="seconds the first case of a shape is expected to take, under --time-budget (default 45; smoke 5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check of the script: a tiny model, float32, few steps; sides mftune, plain and trl if installed",
    )
    args = parser.parse_args(argv)
    args.out = args.out or Path("throughput.json")
    args.fastest_micro = side_sizes(parser, args.fastest_micro)
    if args.case_estimate is None:
        args.case_estimate = 5.0 if args.smoke else 45.0
    if not args.smoke:
        args.methods, args.sides = args.methods or list(METHODS), args.sides or list(SIDES)
        return args
    if args.methods and "qlora" in args.methods and not util.find_spec("bitsandbytes"):
        parser.error("--smoke with qlora needs bitsandbytes (>= 0.47 runs on the CPU)")
    args.shapes, args.methods = ["tiny"], args.methods or ["full", "lora"]
    args.sides = args.sides or [s for s in SIDES if s != "trl" or util.find_spec("trl")]
    args.micro_batches = args.micro_batches or [2]
    args.threads = args.threads or 1  # one thread per case: robust to busy cores
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    profile = profile_from(args)
    if profile.tokens_per_step % profile.max_len or profile.steps < 1 or profile.warmup_steps < 1:
        raise SystemExit("--tokens-per-step must be a multiple of --max-len; --steps, --warmup-steps >= 1")
    in_workdir(args, "mftune-throughput-", lambda args, workdir: run(args, profile, workdir))


if __name__ == "__main__":
    main()
