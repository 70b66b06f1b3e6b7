"""`mftune serve TARGET`: pick the engine, load what TARGET names, and serve it (see docs/serving.md)."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

API_KEY_ENV = "MFTUNE_API_KEY"


def main(args) -> int:
    """Run `mftune serve` from parsed arguments; the exit status (serving blocks until SIGTERM/SIGINT)."""
    from mftune.config import ConfigError
    from mftune.config.errors import MissingPackageError
    from mftune.eval.target import TargetError, resolve_target

    try:
        target = resolve_target(args.target)
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        name = args.model_name or default_name(target.path)
        engine = choose_engine(args.engine)
        _warn_if_exposed(args.host, api_key)
        if engine == "vllm":
            return _exec_vllm(target, name, args, api_key)
        return _serve_embedded(target, name, args, api_key)
    except (TargetError, ConfigError, MissingPackageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def default_name(path: Path) -> str:
    """A run is served under its folder's name; a checkpoint as RUN-step-N; a model under its folder's."""
    path = path.resolve()
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-{path.name}"
    return path.name


def choose_engine(requested: str) -> str:
    """`vllm` or `transformers`. `auto`: vLLM when it is installed and a GPU is present.

    Raises:
        MissingPackageError: vllm asked for and not installed.
    """
    from mftune.config.errors import MissingPackageError

    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm" and not has_vllm:
        raise MissingPackageError(
            "--engine vllm needs vLLM (and a GPU): pip install vllm, or use --engine transformers"
        )
    if requested != "auto":
        return requested
    import torch

    return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and api_key is None:
        print(
            f"warning: serving on {host} without an API key: anyone who can reach this port can use the "
            f"model (set --api-key or {API_KEY_ENV})",
            file=sys.stderr,
        )


def _serve_embedded(target, name: str, args, api_key: str | None) -> int:
    from mftune.config.errors import MissingPackageError

    missing = [p for p in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(p) is None]
    if missing:
        raise MissingPackageError(f"mftune serve needs {', '.join(missing)}: pip install 'mftune[serve]'")
    import torch
    import uvicorn

    from mftune.eval.target import context_length, load_target
    from mftune.infer.load import stop_token_ids
    from mftune.serve.app import Served, build_app
    from mftune.serve.batcher import DynamicBatcher
    from mftune.serve.requests import Limits

    run_cfg = _run_config(target)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_target(target, run_cfg, device)
    model.config.use_cache = True
    batcher = DynamicBatcher(
        model,
        tokenizer,
        stop_token_ids(model, tokenizer),
        max_batch=args.max_concurrency,
        wait_s=args.batch_wait_ms / 1000,
    )
    limits = Limits(max_tokens=args.max_tokens, max_n=args.max_n)
    served = Served(name, tokenizer, batcher, context_length(model), limits, int(time.time()))
    app = build_app(served, api_key=api_key)
    print(
        f"serving {name} on http://{args.host}:{args.port}/v1 (engine transformers, batches of up to "
        f"{args.max_concurrency}, API key {'required' if api_key else 'not set'})",
        flush=True,
    )
    # uvicorn stops accepting on SIGTERM (and SIGINT) and lets requests in flight finish within the grace
    # period; afterwards it raises the signal again for the handler it found. That handler is this no-op,
    # so a graceful stop ends with status 0 rather than death by the signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=args.grace_seconds,
    )
    batcher.close()
    return 0


def _run_config(target):
    if target.run_config is None or target.checkpoint is None:
        return None
    from mftune.config import load_config

    return load_config(target.run_config)


def _exec_vllm(target, name: str, args, api_key: str | None) -> int:
    from mftune.eval.target import TargetError
    from mftune.infer.vllm_lora import needs_merge
    from mftune.serve.vllm_command import vllm_command

    if target.model_dir is None:
        raise TargetError(
            "--engine vllm serves a run's final/ or a model folder; merge a checkpoint first, or use "
            "--engine transformers"
        )
    merged = None
    if needs_merge(target.model_dir):
        from mftune.export.merge import merge_adapter

        merged = Path(tempfile.mkdtemp(prefix="mftune-serve-")) / "merged"
        print(f"the adapter trains whole modules, which vLLM's LoRA cannot load: merging into {merged}")
        merge_adapter(target.model_dir, merged)
    launch = vllm_command(
        target.model_dir,
        name=name,
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_concurrency=args.max_concurrency,
        merged_dir=merged,
    )
    executable = shutil.which(launch.argv[0])
    if executable is None:
        raise FileNotFoundError("the vllm command is not on PATH")
    print("running: " + " ".join(launch.argv), flush=True)
    os.execve(executable, launch.argv, {**os.environ, **launch.env})  # vLLM takes over this process
    return 0  # not reached
