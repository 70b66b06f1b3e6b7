"""Training invariants: batch splitting, exact resume, crash-safe checkpoints, packed = unpacked, files written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mftune.config import load_config
from mftune.data.pipeline import load_tokenizer, prepare_data
from mftune.train.batches import BatchPlan, DataPosition, collate, iterate_steps
from mftune.train.checkpoint import latest_checkpoint
from mftune.train.loop import train
from mftune.train.step import token_losses
from mftune.train.tracking import read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def make_config(tmp_path: Path, model_dir: Path, out: str, **train) -> Path:
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "finetune": {"method": "full"},
        "data": {
            "tasks": {
                "write_test": {"path": str(EXAMPLES / "write_test")},
                "write_function": {"path": str(EXAMPLES / "write_function"), "loss_weight": 2.0},
            },
            "max_seq_len": 128,
            "cache_dir": str(tmp_path / "cache"),
            "num_proc": 1,
            "max_valid_samples": 8,
        },
        "train": {
            "output_dir": str(tmp_path / out),
            "learning_rate": 1e-3,
            "warmup_steps": 1,
            "max_steps": 2,
            "global_batch_size": 4,
            "micro_batch_size": 1,
            "log_every": 1,
            "eval_every": 100,
            "save_every": 100,
            "tensorboard": False,
            "plots": False,
            **train,
        },
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("strategy", ["token", "sample", "task", "task_sample"])
def test_micro_batch_4_equals_accumulation_4(tmp_path, tiny_model_dir, strategy):
    runs = {}
    for micro in (4, 1):
        name = f"micro{micro}"
        train(load_config(make_config(tmp_path, tiny_model_dir, name, micro_batch_size=micro, loss=strategy)))
        runs[micro] = tmp_path / name
    a = [r for r in read_metrics(runs[4]) if "train/loss" in r]
    b = [r for r in read_metrics(runs[1]) if "train/loss" in r]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5)
        assert x["train/write_test/weight"] == pytest.approx(y["train/write_test/weight"], rel=1e-5)
    wa = load_file(next((runs[4] / "final").glob("*.safetensors")))
    wb = load_file(next((runs[1] / "final").glob("*.safetensors")))
    assert wa.keys() == wb.keys()
    for key in wa:
        # Adam divides by sqrt(v), which amplifies fp32 rounding of near-zero gradients: allow 1% of one
        # update (lr 1e-3), far below what a wrong normalisation would change.
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5)


def test_a_step_moves_weights_and_logs_every_task(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    train(load_config(make_config(tmp_path, tiny_model_dir, "run", eval_every=2)))
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    last = rows[-1]
    for task in ("write_test", "write_function"):
        assert last[f"valid/{task}/loss"] > 0 and 0 <= last[f"valid/{task}/accuracy"] <= 1
    # `task` strategy with loss weights 1 and 2: the logged weight mass is 1/3 and 2/3 when both are present.
    assert rows[0]["step"] == 0 and "valid/loss" in rows[0]  # the baseline evaluation before training
    first = next(r for r in rows if "train/loss" in r)
    if first["train/write_test/tokens"] and first["train/write_function/tokens"]:
        assert first["train/write_test/weight"] == pytest.approx(1 / 3, rel=1e-5)
    before = load_file(next(Path(tiny_model_dir).glob("*.safetensors")))
    after = load_file(next((run / "final").glob("*.safetensors")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_log_lines_report_train_seconds_and_the_input_tokens_of_their_steps(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, "run", max_steps=4, log_every=2)
    train(load_config(config))
    logged = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert [r["step"] for r in logged] == [2, 4]

    # The same steps drawn again from the data plan; a row lists (task, sample, start, end) slices of samples.
    cfg = load_config(config)
    steps = iterate_steps(prepare_data(cfg, load_tokenizer(cfg.model)), BatchPlan(4, 1), DataPosition())
    real = [
        sum(end - start for rows in next(steps)[1] for row in rows for *_, start, end in row)
        for _ in range(4)
    ]
    assert [r["train/input_tokens"] for r in logged] == [real[0] + real[1], real[2] + real[3]]
    for r in logged:
        assert r["train/seconds"] > 0
        assert r["tokens_per_second"] == pytest.approx(r["train/input_tokens"] / r["train/seconds"])
        trained = r["train/write_test/tokens"] + r["train/write_function/tokens"]
        assert r["trained_tokens_per_second"] == pytest.approx(trained / r["train/seconds"])
        assert "train/max_memory_gib" not in r  # CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_log_lines_report_the_peak_cuda_memory_so_far(tmp_path, tiny_model_dir):
    train(load_config(make_config(tmp_path, tiny_model_dir, "run", max_steps=3)))
    peaks = [r["train/max_memory_gib"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert len(peaks) == 3 and 0 < peaks[0] <= peaks[1] <= peaks[2]
    assert peaks[-1] <= torch.cuda.max_memory_allocated() / 2**30


def test_train_seconds_leave_out_evaluation_and_checkpoints_and_count_coba_probes(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Evaluation and checkpoint saves, slowed down, do not count; CoBa's probes, slowed down, do."""
    import mftune.train.checkpoint as checkpoint
    import mftune.train.loop as loop
    import mftune.train.task_weights as balancing
    from mftune.train.tracking import MetricsWriter

    nap = 0.3
    events: list[tuple[str, float, float]] = []  # (what, start, end)

    def slowed(what, real):
        def run(*args, **kwargs):
            start = time.perf_counter()
            time.sleep(nap)
            result = real(*args, **kwargs)
            events.append((what, start, time.perf_counter()))
            return result

        return run

    monkeypatch.setattr(loop, "evaluate", slowed("evaluate", loop.evaluate))
    monkeypatch.setattr(checkpoint, "save_checkpoint", slowed("save", checkpoint.save_checkpoint))
    monkeypatch.setattr(balancing, "probe_losses", slowed("probe", balancing.probe_losses))
    real_write = MetricsWriter.write

    def write(self, step, values):
        if "train/loss" in values:
            now = time.perf_counter()
            events.append(("log", now, now))
        real_write(self, step, values)

    monkeypatch.setattr(MetricsWriter, "write", write)
    config = make_config(
        tmp_path, tiny_model_dir, "run", loss="coba", max_steps=3, eval_every=1, save_every=1, keep_last=5
    )
    train(load_config(config, [f"{k}={v}" for k, v in COBA.items()]))

    logged = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    # Before step 1: the baseline evaluation, then the baseline probe.
    assert [what for what, *_ in events[:2]] == ["evaluate", "probe"]
    begin = events[1][2]
    logs = [start for what, start, _ in events if what == "log"]
    for i, (row, end) in enumerate(zip(logged, logs, strict=True)):
        inside = [(what, stop - start) for what, start, stop in events if begin < start < end]
        untimed = sum(t for what, t in inside if what in ("evaluate", "save"))
        probed = sum(t for what, t in inside if what == "probe")
        # After step s come its probe, evaluation and save: all in the interval of step s + 1.
        assert len(inside) == (0 if i == 0 else 3)
        # The slack covers what runs between the clock's reads and the recorded times (set-up, log writes).
        assert probed <= row["train/seconds"] <= end - begin - untimed + 0.1
        assert row["tokens_per_second"] == pytest.approx(row["train/input_tokens"] / row["train/seconds"])
        begin = end


def test_four_steps_equal_two_plus_resume_plus_two(tmp_path, tiny_model_dir):
    straight = tmp_path / "straight"
    train(
        load_config(make_config(tmp_path, tiny_model_dir, "straight", max_steps=4, save_every=2, keep_last=5))
    )
    # A run that died right after its step-2 checkpoint: only that checkpoint exists.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    train(
        load_config(make_config(tmp_path, tiny_model_dir, "resumed", max_steps=4, save_every=2, keep_last=5))
    )

    a_dir, b_dir = straight / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004"
    wa, wb = load_file(a_dir / "trainable.safetensors"), load_file(b_dir / "trainable.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = torch.load(a_dir / "optimizer.pt", weights_only=True)
    ob = torch.load(b_dir / "optimizer.pt", weights_only=True)
    for key, state in oa["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], ob["optimizer"]["state"][key]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], ob["optimizer"]["state"][key]["exp_avg_sq"])
    assert oa["scheduler"]["_last_lr"] == ob["scheduler"]["_last_lr"]
    sa = json.loads((a_dir / "trainer_state.json").read_text())
    sb = json.loads((b_dir / "trainer_state.json").read_text())
    assert sa == sb  # same data position, tokens seen, metrics
    # Steps 3 and 4 saw the same data with the same loss.
    la = [r["train/loss"] for r in read_metrics(straight) if r["step"] > 2 and "train/loss" in r]
    lb = [r["train/loss"] for r in read_metrics(resumed) if r["step"] > 2 and "train/loss" in r]
    assert la == lb and len(la) == 2


_SLOW_SAVE = """
import sys, time, torch, safetensors.torch as st
from mftune.train import checkpoint as ckpt
from mftune.train.checkpoint import TrainerState, save_checkpoint
from mftune.train.optim import build_optimizer, build_scheduler
from mftune.config import TrainConfig
out = sys.argv[1]
model = torch.nn.Linear(4, 4)
opt = build_optimizer(model, TrainConfig())
sched = build_scheduler(opt, TrainConfig(), 10)
save_checkpoint(out, model, opt, sched, TrainerState(step=1))
def half_then_hang(tensors, path, *a, **k):
    open(path, "wb").write(b"partial")
    open(out + "/writing", "w").close()
    time.sleep(60)
ckpt.save_file = half_then_hang
save_checkpoint(out, model, opt, sched, TrainerState(step=2))
"""


def test_sigkill_during_checkpoint_never_leaves_a_broken_one(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(tmp_path)])
    deadline = time.monotonic() + 60
    while not (tmp_path / "writing").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert any(name.startswith(".tmp-step-00000002") for name in leftovers)
    from mftune.config import TrainConfig
    from mftune.train.checkpoint import load_checkpoint
    from mftune.train.optim import build_optimizer, build_scheduler

    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, TrainConfig())
    assert (
        load_checkpoint(latest_checkpoint(tmp_path), model, opt, build_scheduler(opt, TrainConfig(), 10)).step
        == 1
    )


def test_sigterm_saves_then_stops_and_the_run_resumes(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, "term", max_steps=400, save_every=1000)
    run = tmp_path / "term"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mftune.cli", "train", str(config)],
        env=env,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    saved = latest_checkpoint(run)
    assert saved is not None
    step = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert 2 <= step < 400
    cfg = load_config(config, [f"train.max_steps={step + 1}"])
    train(cfg)
    assert json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())["step"] == step + 1


def test_packed_loss_equals_unpacked_loss(tmp_path, tiny_model_dir):
    from mftune.model.load import load_model

    per_token = {}
    for packing in ("isolated", "none"):
        cfg = load_config(make_config(tmp_path, tiny_model_dir, "p"), [f"data.packing={packing}"])
        tokenizer = load_tokenizer(cfg.model)
        data = prepare_data(cfg, tokenizer)
        model = load_model(cfg.model, cfg.finetune, device=torch.device("cpu"))
        rows = data.valid_rows(0)
        assert (len(rows) < len(data.tasks[0].valid)) == (packing == "isolated")
        batch = collate(data, rows, tokenizer.pad_token_id, valid=True)
        with torch.no_grad():
            out = token_losses(model, batch, 64)
        # Key every token's loss by (data index of its sample, k-th target of that sample): layout-independent.
        order = [s.sample_id for row in rows for s in data.row_samples(row, valid=True)]
        seen: dict[int, int] = {}
        keyed = []
        for local, loss in zip(out.targets.sample_ids.tolist(), out.loss.tolist(), strict=True):
            sample = order[local]
            seen[sample] = seen.get(sample, -1) + 1
            keyed.append(((sample, seen[sample]), loss))
        per_token[packing] = sorted(keyed)
    assert len(per_token["isolated"]) == len(per_token["none"])
    for (ka, la), (kb, lb) in zip(per_token["isolated"], per_token["none"], strict=True):
        assert ka == kb
        assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)


COBA = {"coba.warmup": 2, "coba.update_interval": 1, "coba.history": 4}


def test_coba_trains_logs_weights_and_resumes_exactly(tmp_path, tiny_model_dir):
    overrides = [f"{k}={v}" for k, v in COBA.items()]
    straight = tmp_path / "straight"
    cfg = make_config(
        tmp_path, tiny_model_dir, "straight", loss="coba", max_steps=4, save_every=2, keep_last=5
    )
    train(load_config(cfg, overrides))
    rows = read_metrics(straight)
    weights = [r for r in rows if "coba/write_test/weight" in r]
    assert [r["step"] for r in weights] == [0, 1, 2, 3, 4]
    for r in weights:
        assert r["coba/write_test/weight"] + r["coba/write_function/weight"] == pytest.approx(1.0, abs=1e-6)
    assert weights[0]["coba/write_test/weight"] == pytest.approx(0.5)  # uniform during warm-up

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    cfg = make_config(
        tmp_path, tiny_model_dir, "resumed", loss="coba", max_steps=4, save_every=2, keep_last=5
    )
    train(load_config(cfg, overrides))
    a = json.loads((straight / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    b = json.loads((resumed / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert a["extra"]["coba"] == b["extra"]["coba"]
    wa = load_file(straight / "checkpoints" / "step-00000004" / "trainable.safetensors")
    wb = load_file(resumed / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_moe_router_loss_is_added_once_per_step(tiny_model_dir):
    """A mixture-of-experts model's step loss = weighted cross entropy + the mean router loss of its micro-batches."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from mftune.data.collate import Sample, collate_rows
    from mftune.loss.weighting import count_step
    from mftune.train.step import LossSpec, weighted_loss

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.5,
    )
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(1, 64, (12,)).numpy()
    sample = Sample(input_ids=ids, trained=ids > 0, task_id=0, sample_id=0)
    batch = collate_rows([[sample]], 0)
    batch["packed"] = True
    counts = count_step([batch], 1)
    spec = LossSpec("token", torch.ones(1))
    with torch.no_grad():
        loss, _ = weighted_loss(model, batch, counts, spec, router_share=0.25)
        reference = model(input_ids=batch["input_ids"], labels=batch["labels"], output_router_logits=True)
    cross_entropy = reference.loss - 0.5 * reference.aux_loss  # transformers adds coef * aux to its loss
    assert loss == pytest.approx(float(cross_entropy + 0.25 * 0.5 * reference.aux_loss), rel=1e-5)
