"""Benchmark of `mftune serve`: a bounded loopback load, with batching on and off, in one run.

Builds a tiny random-weight llama (or takes `--model`), starts `mftune serve` on 127.0.0.1 twice (the
embedded engine batching up to 16 sequences, then with `--max-concurrency 1`, one sequence at a time),
and runs against each the same load: C concurrent clients, each sending R chat requests one after
another (different prompts, greedy, `max_tokens` fixed), for C = 1, 4 and 16. It stops by itself and
prints requests/s, output tokens/s (from each response's usage) and p50/p99 latency per setting.

    python benchmarks/serve_load.py                       # the tiny model on the CPU, a minute or two
    python benchmarks/serve_load.py --model PATH --requests 8 --max-tokens 64 --engine vllm  # on a GPU

Run it on an idle machine: the server and its clients share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchlib import OFFLINE, free_port, markdown_table

CONCURRENCY = (1, 4, 16)


def start_server(model: Path, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "mftune.cli",
        "serve",
        str(model),
        "--port",
        str(port),
        "--model-name",
        "bench",
        *extra,
    ]
    process = subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE}
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not start; see {log}")


def one_request(port: int, index: int, max_tokens: int) -> tuple[float, int]:
    body = {
        "model": "bench",
        "messages": [
            {"role": "user", "content": f"Request {index}: write the numbers from {index} to {index + 9}."}
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


def load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            seconds, generated = one_request(port, c * requests + r, max_tokens)
            with lock:
                latencies.append(seconds)
                tokens[0] += generated

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens[0] / wall,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model or run folder (default: a tiny llama built here)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument("--engine", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument(
        "--clients", type=int, nargs="+", default=list(CONCURRENCY), help="the C to run (default 1 4 16)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mftune-serve-bench-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            from mftune.tiny import build_tiny_model

            model = build_tiny_model(workdir / "tiny", "llama", hidden_size=128, num_layers=4)
        settings = [("batching (up to 16)", ["--max-concurrency", "16"])]
        if args.engine == "transformers":
            settings.append(("one at a time", ["--max-concurrency", "1"]))
        rows, report = [], []
        for label, extra in settings:
            port = free_port()
            server = start_server(model, port, ["--engine", args.engine, *extra], workdir / f"{port}.log")
            try:
                one_request(port, 0, args.max_tokens)  # warm-up
                for clients in args.clients:
                    result = {"setting": label, **load(port, clients, args.requests, args.max_tokens)}
                    report.append(result)
                    rows.append((
                        label, str(clients), str(result["requests"]), f"{result['requests_per_s']:.2f}",
                        f"{result['tokens_per_s']:.0f}", f"{result['p50_s']:.3f}", f"{result['p99_s']:.3f}",
                    ))  # fmt: skip
                    print(rows[-1], flush=True)
            finally:
                server.terminate()
                server.wait(timeout=120)
    header = ("setting", "clients", "requests", "requests/s", "output tokens/s", "p50 s", "p99 s")
    print(f"\nmodel {args.model or 'tiny llama (hidden 128, 4 layers)'}, engine {args.engine}, "
          f"max_tokens {args.max_tokens}, greedy, {args.requests} requests per client")  # fmt: skip
    print(markdown_table(header, rows, right=range(1, 7)))
    if len(settings) == 2:
        for clients in args.clients:
            on, off = (
                next(r for r in report if r["setting"] == s and r["clients"] == clients) for s, _ in settings
            )
            print(
                f"C={clients}: batching gives {on['tokens_per_s'] / off['tokens_per_s']:.2f}x the output tokens/s"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
