"""`mftune serve` as clients see it: a live server on 127.0.0.1, driven by the real `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

openai = pytest.importorskip("openai", reason="the serving tests use the openai client (mftune[serve])")
pytest.importorskip("fastapi")

from mftune.cli import main  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
KEY = "test-key-123"
CONVERSATIONS = [[{"role": "user", "content": f"Question {i}: what is `{i} + {i * 3}`?"}] for i in range(32)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mftune serve` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, target: Path, *args: str, env: dict | None = None):
        self.port = _free_port()
        command = [sys.executable, "-m", "mftune.cli", "serve", str(target), "--port", str(self.port), *args]
        self.log = open(Path(target).parent / f"serve-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("the server did not start")

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
            return json.loads(r.read())

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def raw(self, path: str, body: object, key: str | None = KEY) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method="POST")
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Two LoRA steps at a small learning rate: replies stay long and varied."""
    tmp = tmp_path_factory.mktemp("serve-run")
    raw = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8}},
        "data": {
            "tasks": {"arithmetic": {"path": str(EXAMPLES / "arithmetic")}},
            "template": {"kind": "role_markers"},
            "max_seq_len": 128,
            "cache_dir": str(tmp / "cache"),
            "num_proc": 1,
            "max_valid_samples": 4,
        },
        "train": {
            "output_dir": str(tmp / "demo"),
            "learning_rate": 1e-4,
            "max_steps": 2,
            "global_batch_size": 2,
            "micro_batch_size": 2,
            "eval_every": 100,
            "save_every": 100,
            "tensorboard": False,
            "plots": False,
        },
    }
    (tmp / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp / "run.yaml")]) == 0
    return tmp / "demo"


@pytest.fixture(scope="module")
def server(run_dir: Path):
    served = Server(run_dir, "--max-concurrency", "16", "--batch-wait-ms", "50", env={"MFTUNE_API_KEY": KEY})
    yield served
    assert served.stop() == 0


@pytest.fixture(scope="module")
def reference(run_dir: Path):
    """The run loaded in this process, as `mftune generate` loads it."""
    from mftune.infer import load_for_inference

    return load_for_inference(run_dir, device="cpu")


def _greedy(reference, conversations, max_new_tokens: int = 24) -> list[str]:
    from mftune.infer import generate_batch

    model, tokenizer = reference
    return generate_batch(model, tokenizer, conversations, max_new_tokens=max_new_tokens)


def _chat(client, messages, **kwargs):
    return client.chat.completions.create(model="demo", messages=messages, temperature=0, **kwargs)


def test_models_and_health(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == ["demo"]
    assert server.health()["status"] == "ok"


def test_greedy_answers_equal_mftune_generate(server: Server, reference) -> None:
    client = server.client()
    served = [_chat(client, c, max_tokens=24).choices[0].message.content for c in CONVERSATIONS[:4]]
    expected = _greedy(reference, CONVERSATIONS[:4])
    assert [s.strip() for s in served] == expected
    assert any(expected)  # the replies are not all empty


def test_streamed_deltas_and_usage_equal_the_plain_answer_and_a_recount(server: Server, reference) -> None:
    from mftune.infer.generate import prompt_ids
    from mftune.infer.load import stop_token_ids

    client, messages = server.client(), CONVERSATIONS[5]
    plain = _chat(client, messages, max_tokens=20)
    chunks = list(_chat(client, messages, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0] == plain.usage
    # Recount: the prompt as training tokenizes it, and the tokens generate() produces up to a stop token.
    model, tokenizer = reference
    prompt = prompt_ids(tokenizer, messages)
    stops = set(stop_token_ids(model, tokenizer))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=sorted(stops)
        )
    new = out[0, len(prompt) :].tolist()
    ended = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
    assert plain.usage.prompt_tokens == len(prompt)
    assert plain.usage.completion_tokens == ended
    assert plain.choices[0].finish_reason == ("stop" if ended < 20 or new[-1] in stops else "length")


def test_a_stop_string_ends_the_answer_there(server: Server) -> None:
    client, messages = server.client(), CONVERSATIONS[6]
    full = _chat(client, messages, max_tokens=24).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = full.find(stop)
    answer = _chat(client, messages, max_tokens=24, stop=[stop])
    assert answer.choices[0].message.content == full[:cut]
    assert answer.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in _chat(client, messages, max_tokens=24, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == full[:cut]


def test_completions_take_a_string_or_a_list_and_n(server: Server) -> None:
    client = server.client()
    one = client.completions.create(model="demo", prompt="def add(a, b):", max_tokens=8, temperature=0)
    many = client.completions.create(
        model="demo", prompt=["def add(a, b):", "x ="], max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == one.choices[0].text  # greedy: n copies
    assert many.usage.prompt_tokens > one.usage.prompt_tokens
    sampled = client.completions.create(
        model="demo", prompt="x =", max_tokens=8, temperature=1.0, n=3, seed=7
    )
    again = client.completions.create(model="demo", prompt="x =", max_tokens=8, temperature=1.0, n=3, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in sampled.choices}) > 1  # and each sample draws its own


def test_concurrent_requests_are_batched_without_cross_talk(server: Server, reference) -> None:
    expected = _greedy(reference, CONVERSATIONS, max_new_tokens=12)
    client, answers = server.client(), [None] * len(CONVERSATIONS)
    before = server.health()

    def ask(i: int) -> None:
        answers[i] = _chat(client, CONVERSATIONS[i], max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(CONVERSATIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [a.strip() if a is not None else None for a in answers] == expected
    after = server.health()
    sequences, batches = after["sequences"] - before["sequences"], after["batches"] - before["batches"]
    assert sequences == 32 and batches < 32  # requests that arrived together shared a batch


def test_the_api_key_is_required_except_for_health(server: Server) -> None:
    for key in (None, "wrong-key"):
        with pytest.raises(openai.AuthenticationError):
            server.client(key).models.list()
    status, body = server.raw("/v1/chat/completions", {"model": "demo", "messages": []}, key="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert server.health()["status"] == "ok"  # open without a key


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "demo"}, "messages"),
        ({"model": "demo", "messages": "hi"}, "messages"),
        ({"model": "demo", "messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
        ({"model": "demo", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "demo", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
        (
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
            "max_tokens",
        ),
        ({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": 99}, "n"),
        (
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            "temperature",
        ),
        ({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
        ({"model": "demo", "messages": [{"role": "user", "content": "word " * 1100}]}, "messages"),
    ],
)
def test_malformed_requests_are_400s_naming_the_field(server: Server, body: dict, param: str) -> None:
    status, answer = server.raw("/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


def test_bad_bodies_unknown_models_and_then_a_good_request(server: Server) -> None:
    assert server.raw("/v1/chat/completions", b"{not json")[0] == 400
    assert _declared_too_large(server).startswith(b"HTTP/1.1 400")  # over the 1 MiB body limit
    assert server.raw("/v1/completions", {"model": "demo", "prompt": [1, 2]})[1]["error"]["param"] == "prompt"
    status, body = server.raw(
        "/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 404 and body["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="other", messages=CONVERSATIONS[0])
    assert _chat(server.client(), CONVERSATIONS[0], max_tokens=4).choices[0].finish_reason in (
        "stop",
        "length",
    )


def _declared_too_large(server: Server) -> bytes:
    """The answer to a request that declares a 2 MiB body and sends one byte of it: refused unread."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {KEY}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 2097152\r\n\r\n{"
        )
        return conn.recv(65536)


def test_a_client_that_leaves_mid_stream_frees_its_sequence(server: Server) -> None:
    before = server.health()["cancelled"]
    stream = _chat(server.client(), CONVERSATIONS[7], max_tokens=4000, stream=True)
    for _ in range(3):
        next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while server.health()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.health()["cancelled"] == before + 1


def test_served_adapter_equals_served_merged_model(server: Server, run_dir: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert main(["merge", str(run_dir), "--out", str(merged)]) == 0
    other = Server(merged, "--model-name", "demo")
    try:
        for messages in CONVERSATIONS[:4]:
            ours = _chat(server.client(), messages, max_tokens=16).choices[0].message.content
            theirs = _chat(other.client(None), messages, max_tokens=16).choices[0].message.content
            assert ours == theirs
    finally:
        assert other.stop() == 0


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(run_dir: Path) -> None:
    served = Server(run_dir, "--model-name", "demo", "--grace-seconds", "60")
    stream = _chat(served.client(None), CONVERSATIONS[8], max_tokens=300, stream=True)
    first = next(iter(stream))
    served.process.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first.choices and rest[-1].choices[0].finish_reason in ("stop", "length")
    assert served.stop() == 0
    with pytest.raises(OSError):
        served.health()


# Engine choice and the vLLM command line.


def test_vllm_command_serves_the_adapter_with_the_runs_template_and_stop(run_dir: Path) -> None:
    from mftune.infer.vllm_lora import needs_merge
    from mftune.serve.vllm_command import vllm_command

    final = run_dir / "final"
    launch = vllm_command(final, name="demo", host="127.0.0.1", port=9000, api_key="k", max_concurrency=32)
    argv = launch.argv
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert argv[:3] == ["vllm", "serve", base]
    assert argv[argv.index("--lora-modules") + 1] == f"demo={final}"
    assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "8"
    assert argv[argv.index("--chat-template") + 1] == str(final / "chat_template.jinja")
    assert argv[argv.index("--generation-config") + 1] == str(final)
    assert argv[argv.index("--tokenizer") + 1] == str(final)
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "9000"
    assert argv[argv.index("--max-num-seqs") + 1] == "32"
    assert "k" not in argv and launch.env == {"VLLM_API_KEY": "k"}  # never on the command line
    assert not needs_merge(final)
    merged = vllm_command(
        final, name="demo", host="0.0.0.0", port=1, api_key=None, max_concurrency=1, merged_dir=run_dir
    )
    assert merged.argv[2] == str(run_dir) and "--enable-lora" not in merged.argv and merged.env == {}


@pytest.mark.parametrize(("rank", "expected"), [(4, 8), (8, 8), (12, 16), (300, 320), (1024, 1024)])
def test_the_vllm_lora_rank_is_the_smallest_accepted_one_that_holds_the_adapter(
    tmp_path: Path, rank: int, expected: int
) -> None:
    from mftune.infer.vllm_lora import max_lora_rank, needs_merge

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": rank, "modules_to_save": ["lm_head"]}))
    assert max_lora_rank(tmp_path) == expected and needs_merge(tmp_path)


def test_engine_auto_picks_vllm_only_with_vllm_and_a_gpu(monkeypatch) -> None:
    import importlib.util

    from mftune.config.errors import MissingPackageError
    from mftune.serve import command

    real = importlib.util.find_spec
    for has_vllm, has_gpu, expected in (
        (True, True, "vllm"),
        (True, False, "transformers"),
        (False, True, "transformers"),
    ):
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, h=has_vllm: object() if n == "vllm" and h else real(n)
        )
        monkeypatch.setattr(torch.cuda, "is_available", lambda g=has_gpu: g)
        assert command.choose_engine("auto") == expected
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "vllm" else real(n))
    with pytest.raises(MissingPackageError, match="--engine vllm needs vLLM"):
        command.choose_engine("vllm")


def test_serve_refuses_what_it_cannot_serve_in_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_a_checkpoint_is_served_as_the_run_it_belongs_to(server: Server, run_dir: Path) -> None:
    from mftune.serve.command import default_name

    checkpoint = run_dir / "checkpoints" / "step-00000002"
    assert default_name(checkpoint) == "demo-step-00000002"
    other = Server(checkpoint)
    try:
        assert [m.id for m in other.client(None).models.list()] == ["demo-step-00000002"]
        for messages in CONVERSATIONS[:3]:
            ours = _chat(server.client(), messages, max_tokens=16).choices[0].message.content
            theirs = other.client(None).chat.completions.create(
                model="demo-step-00000002", messages=messages, max_tokens=16, temperature=0
            )
            assert theirs.choices[0].message.content == ours
    finally:
        assert other.stop() == 0
