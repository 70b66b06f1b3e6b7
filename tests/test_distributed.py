"""Many processes: 2 processes (gloo on CPU) equal 1, resume, ranks without rows, `mftune launch`, shipped configs.

The two-process runs share one `torchrun` (a driver script trains several configs in the same processes),
so the suite pays the start-up of two Python processes once. Every run is full fine-tuning, so every weight
of the model is compared.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mftune.config import load_config
from mftune.train.batches import BatchPlan, DataPosition, iterate_steps, rows_for_step, steps_in_epoch
from mftune.train.checkpoint import latest_checkpoint
from mftune.train.launch import (
    NAMED_CONFIGS,
    LaunchError,
    Topology,
    check_runnable,
    launch_command,
    named_config,
)
from mftune.train.loop import train
from mftune.train.tracking import read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
STRATEGIES = ("token", "sample", "task", "task_sample")
TIMEOUT = 300  # seconds for one multi-process run: a hang fails the test instead of blocking the suite

# Trains each config given, in order, in the same processes; {"copy": [src, dst]} copies a folder between
# runs (main process only, then all wait).
_DRIVER = """
import json, shutil, sys
from accelerate import PartialState
from mftune.config import load_config
from mftune.train.loop import train
for action in json.loads(sys.argv[1]):
    if "copy" in action:
        if PartialState().is_main_process:
            shutil.copytree(*action["copy"])
        PartialState().wait_for_everyone()
    else:
        train(load_config(action["train"]))
"""


def make_config(tmp_path: Path, model_dir: Path, name: str, *, tasks=None, data=None, **train) -> Path:
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "finetune": {"method": "full"},
        "data": {
            "tasks": tasks
            or {
                "write_test": {"path": str(EXAMPLES / "write_test")},
                "write_function": {"path": str(EXAMPLES / "write_function"), "loss_weight": 2.0},
            },
            "max_seq_len": 128,
            "cache_dir": str(tmp_path / "cache"),
            "num_proc": 1,
            "max_valid_samples": 8,
            **(data or {}),
        },
        "train": {
            "output_dir": str(tmp_path / name),
            "learning_rate": 1e-3,
            "warmup_steps": 1,
            "max_steps": 4,
            "global_batch_size": 4,
            "micro_batch_size": 1,
            "log_every": 1,
            "eval_every": 2,
            "save_every": 2,
            "keep_last": 5,
            "tensorboard": False,
            "plots": False,
            **train,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_losses(run: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]


def assert_same_weights(a: Path, b: Path) -> None:
    wa = load_file(next((a / "final").glob("*.safetensors")))
    wb = load_file(next((b / "final").glob("*.safetensors")))
    assert wa.keys() == wb.keys()
    for key in wa:
        # Summation order differs across processes; Adam amplifies fp32 rounding of near-zero gradients:
        # 1% of one update (lr 1e-3) is far below what a wrong normalisation would change.
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5, msg=f"{a.name} vs {b.name}: {key}")


def run_bounded(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `argv`; if it outlives TIMEOUT (a hang), kill it and every process it started, and fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, _ = proc.communicate()
        pytest.fail(
            f"{' '.join(argv[:6])} ... still running after {TIMEOUT} s (a rank hangs?)\n{out[-4000:]}"
        )
    assert proc.returncode == 0, out[-6000:]
    return subprocess.CompletedProcess(argv, proc.returncode, out)


def _wait_for_logged_steps(proc: subprocess.Popen, run: Path, steps: int) -> None:
    """Block until `run` has logged `steps` training steps; fail if the process dies or TIMEOUT passes."""
    deadline = time.monotonic() + TIMEOUT
    while len(train_losses(run) if (run / "metrics.jsonl").exists() else []) < steps:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launch still running and every process it started (launchers give workers sessions of their own)."""
    import psutil

    if proc.poll() is not None:
        return
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    proc.wait()


def torchrun(tmp_path: Path, actions: list[dict]) -> str:
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return run_bounded([*argv, str(driver), json.dumps(actions)], tmp_path).stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- which rows each rank gets -------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_is_trained_once_per_epoch_across_ranks(world_size):
    rows = [[("t", i, 0, 1)] for i in range(29)]  # 29 rows: not a multiple of any global batch below
    data = SimpleNamespace(epoch_rows=lambda epoch: rows)
    for micro in (1, 2):
        plan = BatchPlan(global_batch=micro * world_size * 2, micro_batch=micro, world_size=world_size)
        num_steps = steps_in_epoch(len(rows), plan)
        assert len(rows) % plan.global_batch
        seen = []
        per_rank = [
            list(itertools.islice(iterate_steps(data, replace(plan, rank=rank), DataPosition()), num_steps))
            for rank in range(world_size)
        ]
        for rank_steps in per_rank:
            for _, micro_rows in rank_steps:
                seen += [row for mb in micro_rows for row in mb]
        assert sorted(r[0][1] for r in seen) == list(range(len(rows)))
        for step in range(num_steps):  # every rank runs as many micro-batches in every step
            counts = {len(per_rank[r][step][1]) for r in range(world_size)}
            assert len(counts) == 1, (step, counts)
            if step < num_steps - 1:
                assert counts == {plan.accumulation}
                assert all(mb for r in range(world_size) for mb in per_rank[r][step][1])


def test_a_rank_past_the_last_row_gets_empty_micro_batches():
    rows = [[("t", i, 0, 1)] for i in range(5)]
    plan = BatchPlan(global_batch=4, micro_batch=1, world_size=2, rank=1)
    assert rows_for_step(rows, 1, plan) == [[]]  # the 5th row goes to rank 0; rank 1 runs a filler
    assert rows_for_step(rows, 1, BatchPlan(4, 1, 2, 0)) == [[rows[4]]]


def test_a_filler_micro_batch_adds_exactly_nothing(tmp_path, tiny_model_dir):
    """A step with an extra filler micro-batch has the same loss and gradients, and the filler's loss is 0."""
    from mftune.data.pipeline import load_tokenizer, prepare_data
    from mftune.loss.weighting import count_step
    from mftune.model.load import load_model
    from mftune.train.batches import collate_micro_batches, filler_batch
    from mftune.train.step import LossSpec, weighted_loss

    cfg = load_config(make_config(tmp_path, tiny_model_dir, "filler"))
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    model = load_model(cfg.model, cfg.finetune, device=torch.device("cpu"))
    rows = data.epoch_rows(0)[:2]
    spec = LossSpec("task", torch.tensor([1.0, 2.0]))
    grads = []
    for micro_rows in ([[rows[0]], [rows[1]]], [[rows[0]], [], [rows[1]]]):
        batches = collate_micro_batches(data, micro_rows, tokenizer.pad_token_id)
        counts = count_step(batches, 2)
        model.zero_grad()
        total = 0.0
        for batch in batches:
            loss, _ = weighted_loss(model, batch, counts, spec)
            if batch.get("filler"):
                assert loss.item() == 0.0
            loss.backward()
            total += loss.item()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, total))
    (ga, la), (gb, lb) = grads
    assert la == lb
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    assert filler_batch(data, 0)["labels"].eq(-100).all()


# --- two processes -------------------------------------------------------------------------------------


def _edge_tasks(tmp_path: Path) -> dict:
    """Two tasks of 3 and 2 samples, each with a 1-sample validation file."""
    tasks = {}
    for name, count in (("alpha", 3), ("beta", 2)):
        folder = tmp_path / "edge_data" / name
        folder.mkdir(parents=True, exist_ok=True)
        records = [
            {"instruction": f"Say {name} {i}.", "output": f"{name} {i} " * (i + 2)} for i in range(count + 1)
        ]
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:count]))
        (tmp_path / "edge_data" / f"{name}_valid.jsonl").write_text(json.dumps(records[count]) + "\n")
        tasks[name] = {"path": str(folder), "valid_path": str(tmp_path / "edge_data" / f"{name}_valid.jsonl")}
    return tasks


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_model_dir) -> Path:
    """All two-process runs of this module, in one torchrun: every strategy, a resumed run, the edge run."""
    root = tmp_path_factory.mktemp("two_processes")
    actions = [{"train": str(make_config(root, tiny_model_dir, f"{s}-2p", loss=s))} for s in STRATEGIES]
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    step2 = root / "task-2p" / "checkpoints" / "step-00000002"
    actions += [
        {"copy": [str(step2), str(root / "resumed" / "checkpoints" / step2.name)]},
        {"train": str(make_config(root, tiny_model_dir, "resumed", loss="task"))},
    ]
    # 5 samples, global batch 4: the epoch's 2nd step has one row, so rank 1 trains a filler; each task's
    # validation has one row, so rank 1 scores fillers.
    edge = make_config(
        root,
        tiny_model_dir,
        "edge-2p",
        tasks=_edge_tasks(root),
        data={"packing": "none"},
        max_steps=None,
        eval_every=1,
    )
    actions.append({"train": str(edge)})
    out = torchrun(root, actions)
    (root / "torchrun.log").write_text(out)
    return root


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_equal_one_process(two_process_runs, tmp_path, tiny_model_dir, strategy):
    """Global batch 4: micro-batch 1 × accumulation 4 on 1 process = micro-batch 1 × accumulation 2 × 2 processes."""
    one = tmp_path / f"{strategy}-1p"
    train(load_config(make_config(tmp_path, tiny_model_dir, one.name, loss=strategy)))
    two = two_process_runs / f"{strategy}-2p"
    assert json.loads((two / "environment.json").read_text())["world_size"] == 2
    a, b = train_losses(one), train_losses(two)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-5)
    va = [r["valid/loss"] for r in read_metrics(one) if "valid/loss" in r]
    vb = [r["valid/loss"] for r in read_metrics(two) if "valid/loss" in r]
    assert len(va) == 3 and va == pytest.approx(vb, rel=1e-5)
    assert_same_weights(one, two)


def test_resume_under_two_processes_equals_an_uninterrupted_run(two_process_runs):
    straight, resumed = two_process_runs / "task-2p", two_process_runs / "resumed"
    a_dir, b_dir = straight / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004"
    wa, wb = load_file(a_dir / "trainable.safetensors"), load_file(b_dir / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = torch.load(a_dir / "optimizer.pt", weights_only=True)
    ob = torch.load(b_dir / "optimizer.pt", weights_only=True)
    for key, state in oa["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], ob["optimizer"]["state"][key]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], ob["optimizer"]["state"][key]["exp_avg_sq"])
    assert json.loads((a_dir / "trainer_state.json").read_text()) == json.loads(
        (b_dir / "trainer_state.json").read_text()
    )
    # The resumed run's metrics.jsonl starts at the checkpoint (the copy holds no earlier lines).
    assert [r["step"] for r in read_metrics(resumed) if "train/loss" in r] == [3, 4]
    assert train_losses(resumed) == train_losses(straight)[2:]


def test_ranks_without_rows_take_part_and_add_nothing(two_process_runs, tmp_path, tiny_model_dir):
    """A rank with no row on the last step, or no validation row, neither hangs nor changes a number."""
    one = tmp_path / "edge-1p"
    train(
        load_config(
            make_config(
                tmp_path,
                tiny_model_dir,
                one.name,
                tasks=_edge_tasks(tmp_path),
                data={"packing": "none"},
                max_steps=None,
                eval_every=1,
            )
        )
    )
    two = two_process_runs / "edge-2p"
    a, b = train_losses(one), train_losses(two)
    assert len(a) == len(b) == 2  # 5 samples, global batch 4
    assert a == pytest.approx(b, rel=1e-5)
    last_a = [r for r in read_metrics(one) if "train/loss" in r][-1]
    last_b = [r for r in read_metrics(two) if "train/loss" in r][-1]
    tokens = last_a["train/alpha/tokens"] + last_a["train/beta/tokens"]
    assert tokens == last_b["train/alpha/tokens"] + last_b["train/beta/tokens"] > 0
    valid_a = [r for r in read_metrics(one) if "valid/loss" in r]
    valid_b = [r for r in read_metrics(two) if "valid/loss" in r]
    assert len(valid_a) == len(valid_b) == 3
    for x, y in zip(valid_a, valid_b, strict=True):
        for task in ("alpha", "beta"):
            assert x[f"valid/{task}/loss"] == pytest.approx(y[f"valid/{task}/loss"], rel=1e-5)
    assert_same_weights(one, two)


def test_only_the_main_process_prints(two_process_runs):
    log = (two_process_runs / "torchrun.log").read_text()
    # The 4 strategy runs evaluate at steps 0, 2 and 4, the resumed run at 4, the edge run at 0, 1 and 2.
    assert log.count(": valid/loss ") == 4 * 3 + 1 + 3
    assert log.count("resumed from ") == 1


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, tiny_model_dir):
    """Schedulers may signal the processes at different moments: the ranks agree to stop after the same step."""
    import psutil

    config = make_config(tmp_path, tiny_model_dir, "term", max_steps=400, save_every=1000, eval_every=1000)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv += ["-m", "mftune.cli", "train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "term"
    try:
        _wait_for_logged_steps(proc, run, 2)
        workers = psutil.Process(proc.pid).children(recursive=True)
        rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        _kill_tree(proc)
    step = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())["step"]
    assert 2 <= step < 400
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r][-1] == step


# --- mftune launch -------------------------------------------------------------------------------------


def test_launch_ddp_runs_two_processes_on_cpu(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, "launched", loss="task", max_steps=2, eval_every=100)
    out = run_bounded(
        [
            sys.executable,
            "-m",
            "mftune.cli",
            "launch",
            str(config),
            "--accelerate",
            "ddp",
            "--num-processes",
            "2",
            "--main-process-port",
            str(free_port()),
            "train.save_every=100",
        ],
        tmp_path,
    ).stdout
    assert out.count("done: ") == 1
    launched = tmp_path / "launched"
    assert json.loads((launched / "environment.json").read_text())["world_size"] == 2
    one = tmp_path / "one"
    train(load_config(make_config(tmp_path, tiny_model_dir, "one", loss="task", max_steps=2, eval_every=100)))
    assert train_losses(launched) == pytest.approx(train_losses(one), rel=1e-5)
    assert_same_weights(one, launched)


def test_launch_passes_sigterm_to_the_training_processes(tmp_path, tiny_model_dir):
    """A scheduler's SIGTERM to `mftune launch`: every process saves and stops, and the launch exits 0."""
    config = make_config(tmp_path, tiny_model_dir, "term", max_steps=400, save_every=1000, eval_every=1000)
    argv = [sys.executable, "-m", "mftune.cli", "launch", str(config), "--accelerate", "ddp"]
    argv += ["--num-processes", "2", "--main-process-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "term"
    try:
        _wait_for_logged_steps(proc, run, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        _kill_tree(proc)
    step = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())["step"]
    assert 2 <= step < 400 and (run / "final").is_dir()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without GPUs refuses")
def test_launch_refuses_what_cannot_run_here(tmp_path):
    from mftune.cli import main

    assert main(["launch", str(tmp_path / "none.yaml"), "--accelerate", "zero3"]) == 2  # needs GPUs here
    assert main(["launch", "c.yaml", "--accelerate", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_launch_command_wraps_accelerate_launch(name):
    path = named_config(name)
    argv = launch_command("run.yaml", ["train.max_steps=3"], path, Topology(), num_processes=8, python="py")
    assert argv == [
        "py", "-m", "accelerate.commands.launch", "--config_file", str(path),
        "--num_processes", "8", "--num_machines", "1", "--machine_rank", "0",
        "-m", "mftune.cli", "train", "run.yaml", "train.max_steps=3",
    ]  # fmt: skip


def test_launch_command_for_a_file_many_machines_and_cpu(tmp_path):
    file = tmp_path / "mine.yaml"
    topology = Topology(num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29555)
    argv = launch_command("run.yaml", [], file, topology, num_processes=16, cpu=True, python="py")
    assert argv == [
        "py", "-m", "accelerate.commands.launch", "--config_file", str(file),
        "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1",
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29555", "--mixed_precision", "no",
        "-m", "mftune.cli", "train", "run.yaml",
    ]  # fmt: skip


def test_the_cli_takes_overrides_after_options():
    from mftune.cli import _parse, build_parser

    args = _parse(
        build_parser(), ["launch", "c.yaml", "--accelerate", "ddp", "a.b=1", "--num-processes", "2"]
    )
    assert args.overrides == ["a.b=1"] and args.num_processes == 2 and args.accelerate == "ddp"
    with pytest.raises(SystemExit):
        _parse(build_parser(), ["launch", "c.yaml", "--accelerate", "ddp", "--bogus"])


# --- shipped configs -----------------------------------------------------------------------------------

_EXPECTED = {
    "ddp": ("MULTI_GPU", None, None, None),
    "zero2": ("DEEPSPEED", 2, ("none", "none"), None),
    "zero2-offload": ("DEEPSPEED", 2, ("cpu", "none"), None),
    "zero3": ("DEEPSPEED", 3, ("none", "none"), None),
    "zero3-offload": ("DEEPSPEED", 3, ("cpu", "cpu"), None),
    "fsdp": ("FSDP", None, None, 2),
}


@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_the_package_ships_every_named_config(name):
    settings = yaml.safe_load(named_config(name).read_text())
    backend, stage, offload, fsdp_version = _EXPECTED[name]
    assert settings["distributed_type"] == backend
    assert settings["mixed_precision"] == "bf16" and settings["use_cpu"] is False
    if stage is not None:
        ds = settings["deepspeed_config"]
        assert ds["zero_stage"] == stage
        assert (ds["offload_optimizer_device"], ds["offload_param_device"]) == offload
        assert ds["gradient_accumulation_steps"] == 1
        assert ds["deepspeed_multinode_launcher"] == "standard"
        assert ds.get("zero3_save_16bit_model", stage == 2) is True
    if fsdp_version is not None:
        fsdp = settings["fsdp_config"]
        assert fsdp["fsdp_version"] == fsdp_version
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_reshard_after_forward"] is True  # full shard
        assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # from the model's _no_split_modules


def _launch_env(name: str) -> dict[str, str]:
    """The environment accelerate's launcher gives each process for a shipped config."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = [
        "--config_file",
        str(named_config(name)),
        "--num_processes",
        "2",
        "-m",
        "mftune.cli",
        "train",
        "c",
    ]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_fsdp_config_wraps_each_decoder_layer_also_under_lora(monkeypatch, tiny_model_dir):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from mftune.config.schema import FinetuneConfig, ModelConfig
    from mftune.model.load import load_model

    for key, value in _launch_env("fsdp").items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    for method in ("full", "lora"):
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        model = load_model(
            ModelConfig(name_or_path=str(tiny_model_dir)),
            FinetuneConfig(method=method),
            device=torch.device("cpu"),
        )
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
        assert wrapped == ["LlamaDecoderLayer"] * model.config.num_hidden_layers, method


@pytest.mark.parametrize("name", ["zero2", "zero3-offload"])
def test_deepspeed_config_takes_mftune_batch_clipping_and_optimizer(monkeypatch, name):
    from accelerate.utils import DeepSpeedPlugin

    from mftune.train.distributed import configure_deepspeed

    for key, value in _launch_env(name).items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=8)
    configure_deepspeed(accelerator, micro_batch_size=2, max_grad_norm=0.5)
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == int(name[4])
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (2, 16)
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds.get("zero_force_ds_cpu_optimizer", True) is (name == "zero2")


def test_check_runnable_refuses_sharded_backends_without_gpus():
    check_runnable(named_config("ddp"), has_gpu=False)
    for name in ("zero2", "zero3-offload", "fsdp"):
        with pytest.raises(LaunchError, match="needs CUDA GPUs"):
            check_runnable(named_config(name), has_gpu=False)


# --- sharded checkpoints (the ZeRO / FSDP format), exercised on one CPU process -------------------------


def test_sharded_checkpoint_format_resumes_exactly(monkeypatch, tmp_path, tiny_model_dir):
    """The collective save_state/load_state path resumes 2 + 2 steps into the same weights as 4 steps."""
    import mftune.train.loop as loop

    monkeypatch.setattr(loop, "shards_state", lambda accelerator: True)
    straight = tmp_path / "straight"
    train(load_config(make_config(tmp_path, tiny_model_dir, "straight")))
    step2 = straight / "checkpoints" / "step-00000002"
    assert (step2 / "accelerate_state").is_dir() and not (step2 / "trainable.safetensors").exists()
    resumed = tmp_path / "resumed"
    shutil.copytree(step2, resumed / "checkpoints" / step2.name)
    train(load_config(make_config(tmp_path, tiny_model_dir, "resumed")))
    assert train_losses(resumed) == train_losses(straight)[2:]
    wa = load_file(next((straight / "final").glob("*.safetensors")))
    wb = load_file(next((resumed / "final").glob("*.safetensors")))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    monkeypatch.setattr(loop, "shards_state", lambda accelerator: False)
    with pytest.raises(ValueError, match="sharded state"):
        train(load_config(make_config(tmp_path, tiny_model_dir, "resumed"), ["train.max_steps=6"]))


# --- sharded weights: FSDP2 and ZeRO-3 around mftune's step, on CPU --------------------------------------

# accelerate runs FSDP and DeepSpeed only on GPUs (on CPUs it falls back to DDP), so this driver shards the
# model itself (`fully_shard`, or `deepspeed.initialize`) and gives `train_step` a stand-in for the few
# `Accelerator` members it uses, each doing what accelerate does for that backend. Under torchrun it trains
# 2 steps with each variant named in argv and saves the step results and full weights; imported, `train`
# runs the same steps in one process. Micro-batches hold different numbers of targets, and rank 1 trains a
# filler, so the ranks run different numbers of loss chunks.
_SHARDED_DRIVER = """
import contextlib, os, sys
from types import SimpleNamespace

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import mftune.train.step as step_module
from mftune.data.collate import Sample, collate_rows

SPEC = step_module.LossSpec("task", torch.tensor([1.0, 2.0]), chunk_size=8)
MAX_GRAD_NORM = 1e6  # no clipping: an update scaled wrongly shows in the weights


def micro_batches(step, rank, world):
    rng = np.random.default_rng(step)
    batches = []
    for _ in range(3):
        rows = []
        for _ in range(2):
            n = int(rng.integers(6, 30))
            sample = Sample(rng.integers(10, 4000, n).astype(np.int32), rng.random(n) < 0.7, int(rng.integers(0, 2)), 0)
            rows.append([sample])
        batches.append({**collate_rows(rows, pad_id=2), "packed": True})
    if world == 1:
        return batches
    pad = Sample(np.array([2], dtype=np.int32), np.zeros(1, dtype=bool), 0, -1)
    filler = {**collate_rows([[pad]], pad_id=2), "packed": True, "filler": True}
    return [batches[:2], [batches[2], filler]][rank]


class StandIn:
    device = torch.device("cpu")

    def __init__(self, backend, world, engine=None):
        self.distributed_type = SimpleNamespace(name=backend)
        self.num_processes = world
        self.engine = engine
        self.sync_gradients = True

    def reduce(self, tensor, reduction):
        if self.num_processes > 1:
            dist.all_reduce(tensor)
        return tensor

    @contextlib.contextmanager
    def no_sync(self, model):
        if self.distributed_type.name == "FSDP":
            model.set_requires_gradient_sync(False)
        yield  # ZeRO-3 reduces in every backward
        if self.distributed_type.name == "FSDP":
            model.set_requires_gradient_sync(True)

    def backward(self, loss):
        if self.engine is None:
            loss.backward()
        else:
            from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

            DeepSpeedEngineWrapper(self.engine).backward(loss, sync_gradients=self.sync_gradients)

    def clip_grad_norm_(self, parameters, max_norm):
        if self.engine is not None:
            return self.engine.get_global_grad_norm()
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def build(variant, model_dir, world):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if variant.startswith("fsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if variant == "fsdp-head":  # its own unit, resharded after each call: sharded when the loss runs
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # SGD: the weights then differ only as the gradients do (Adam amplifies rounding of near-zero ones).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if variant != "zero3":
        return model, optimizer, StandIn("FSDP" if variant.startswith("fsdp") else "NO", world)
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 2 * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": MAX_GRAD_NORM,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # accelerate's optimizer wrapper: DeepSpeed steps and zeroes inside `backward`
    return engine, SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none=True: None), StandIn("DEEPSPEED", world, engine)


def full_weights(model):
    if hasattr(model, "module"):  # DeepSpeed
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.module.parameters())):
            return {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}


def train(variant, model_dir, world=1, rank=0):
    model, optimizer, accelerator = build(variant, model_dir, world)
    scheduler = SimpleNamespace(step=lambda: None)
    sharded_at_loss = []
    loss_fn = step_module.lm_head_loss

    def spy(head, *args, **kwargs):
        weight = head.weight
        sharded_at_loss.append(weight.numel() == 0 or type(weight).__name__ == "DTensor")
        return loss_fn(head, *args, **kwargs)

    step_module.lm_head_loss = spy
    try:
        results = [
            step_module.train_step(accelerator, model, optimizer, scheduler, micro_batches(step, rank, world), SPEC, MAX_GRAD_NORM)
            for step in range(2)
        ]
    finally:
        step_module.lm_head_loss = loss_fn
    return {
        "loss": [r.loss for r in results],
        "grad_norm": [r.grad_norm for r in results],
        "num_tokens": [r.num_tokens for r in results],
        "sharded_at_loss": sharded_at_loss,
        "weights": full_weights(model),
    }


if __name__ == "__main__":
    variants, model_dir, out = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    if "zero3" in variants:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    for variant in variants:
        result = train(variant, model_dir, dist.get_world_size(), dist.get_rank())
        if dist.get_rank() == 0:
            torch.save(result, os.path.join(out, variant + ".pt"))
    dist.destroy_process_group()
"""


def _sharded_runs(tmp_path: Path, model_dir: Path, variants: list[str]) -> dict[str, dict]:
    """Train each variant with 2 processes (one torchrun), and also in one process; results by name."""
    import runpy

    driver = tmp_path / "sharded_driver.py"
    driver.write_text(_SHARDED_DRIVER)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_bounded([*argv, str(driver), ",".join(variants), str(model_dir), str(tmp_path)], tmp_path)
    runs = {v: torch.load(tmp_path / f"{v}.pt", weights_only=True) for v in variants}
    runs["one process"] = runpy.run_path(str(driver))["train"]("single", str(model_dir))
    return runs


def _assert_same_steps(runs: dict[str, dict]) -> None:
    one = runs.pop("one process")
    assert not any(one["sharded_at_loss"])
    for name, run in runs.items():
        assert run["num_tokens"] == one["num_tokens"], name
        assert run["loss"] == pytest.approx(one["loss"], rel=1e-5), name
        # DeepSpeed sums the squares of its partitions in another order (within 1.5e-5 here).
        assert run["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), name
        assert run["weights"].keys() == one["weights"].keys()
        for key, value in one["weights"].items():
            torch.testing.assert_close(run["weights"][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_fsdp2_step_equals_one_process(tmp_path, tiny_model_dir):
    """FSDP2 (`fully_shard`, gloo): the head in the root unit (as accelerate wraps it) and as its own unit."""
    runs = _sharded_runs(tmp_path, tiny_model_dir, ["fsdp", "fsdp-head"])
    assert not any(runs["fsdp"]["sharded_at_loss"])  # the root stays unsharded between forward and backward
    assert runs["fsdp-head"]["sharded_at_loss"] and all(runs["fsdp-head"]["sharded_at_loss"])
    _assert_same_steps(runs)


def test_zero3_step_equals_one_process(tmp_path, tiny_model_dir):
    """DeepSpeed ZeRO-3 on CPU (gloo): the head's weight is an empty placeholder when the loss runs."""
    pytest.importorskip("deepspeed")
    runs = _sharded_runs(tmp_path, tiny_model_dir, ["zero3"])
    # Once ZeRO-3 has traced a step, it may keep the head gathered from the model's forward to the loss
    # (the head is used again soon); the first micro-batch of a step always finds it partitioned.
    assert runs["zero3"]["sharded_at_loss"][0]
    _assert_same_steps(runs)
