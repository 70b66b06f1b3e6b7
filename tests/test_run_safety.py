"""Nothing a user has is lost or overwritten: the run folder's lock, checkpoint manifests and falling back from
a damaged checkpoint, refusing another config's run folder, merge's refusals, and one-line errors (no
traceback, exit status 2, nothing written) where a run cannot start."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from mftune.cli import main
from mftune.train.checkpoint import complete_checkpoints
from mftune.train.run_folder import LOCK_FILE
from mftune.train.tracking import read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def write_config(tmp_path: Path, model_dir: Path, name: str = "run", **train) -> Path:
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "finetune": {"method": "lora"},
        "data": {
            "tasks": {"write_test": {"path": str(EXAMPLES / "write_test")}},
            "max_seq_len": 128,
            "cache_dir": str(tmp_path / "cache"),
            "num_proc": 1,
            "max_valid_samples": 8,
        },
        "train": {
            "output_dir": str(tmp_path / name),
            "learning_rate": 1e-3,
            "max_steps": 4,
            "global_batch_size": 2,
            "log_every": 1,
            "eval_every": 2,
            "save_every": 2,
            "keep_last": None,
            "tensorboard": False,
            "plots": False,
            **train,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]


# --- the run folder's lock -------------------------------------------------------------------------


def _lock_of(process: psutil.Process) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": process.pid,
        "process_start": process.create_time(),
        "started": "x",
    }


def test_a_second_run_on_a_live_runs_folder_is_refused(capsys, tmp_path, tiny_model_dir) -> None:
    config = write_config(tmp_path, tiny_model_dir)
    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK_FILE).write_text(json.dumps(_lock_of(psutil.Process(sleeper.pid))))
        code, _, err = run(capsys, "train", config)
        one_line_error(code, err, "is in use by another mftune run", f"pid {sleeper.pid}")
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_runs_at_once_one_is_refused(tmp_path, tiny_model_dir) -> None:
    # The first run trains until it is stopped: SIGTERM makes it save and exit.
    config = write_config(tmp_path, tiny_model_dir, max_steps=10**6, save_every=10**6, eval_every=10**6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "mftune.cli", "train", str(config)]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "is in use by another mftune run" in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's log, not two interleaved
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(capsys, tmp_path, tiny_model_dir) -> None:
    config = write_config(tmp_path, tiny_model_dir, max_steps=2)
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = _lock_of(psutil.Process(killed.pid))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps(lock))
    code, _, err = run(capsys, "train", config)
    assert code == 0, err
    assert (tmp_path / "run" / "final").is_dir() and not (tmp_path / "run" / LOCK_FILE).exists()


# --- another config's run --------------------------------------------------------------------------


def test_a_folder_holding_another_run_is_not_overwritten(capsys, tmp_path, tiny_model_dir) -> None:
    assert run(capsys, "train", write_config(tmp_path, tiny_model_dir, max_steps=2))[0] == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    code, _, err = run(
        capsys, "train", write_config(tmp_path, tiny_model_dir, max_steps=2, learning_rate=5e-4)
    )
    one_line_error(code, err, "holds another run", "train.learning_rate")
    code, _, err = run(capsys, "train", write_config(tmp_path, tiny_model_dir, max_steps=2, resume="never"))
    one_line_error(code, err, "holds a run already and train.resume is never")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    # Running longer is how a run is continued: allowed.
    assert run(capsys, "train", write_config(tmp_path, tiny_model_dir, max_steps=4))[0] == 0


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A 4-step LoRA run with checkpoints at steps 2 and 4, and its config."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    config = write_config(tmp, tiny_model_dir)
    assert main(["train", str(config)]) == 0
    return tmp, config


def _crashed_copy(finished_run, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run as a crash right after its step-4 checkpoint leaves it, and a config pointing at it."""
    source, _ = finished_run
    shutil.copytree(source / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "final")
    config = write_config(
        tmp_path, Path(yaml.safe_load((source / "run.yaml").read_text())["model"]["name_or_path"])
    )
    return tmp_path / "run", config


def test_every_checkpoint_has_a_manifest(finished_run) -> None:
    for checkpoint in complete_checkpoints(finished_run[0] / "run"):
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
        assert sorted(manifest) == [f for f in files if f != "manifest.json"]
        assert all(manifest[f]["size"] == (checkpoint / f).stat().st_size for f in manifest)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip, Path.unlink], ids=["truncated", "flipped", "deleted"])
def test_auto_resume_falls_back_from_a_damaged_checkpoint(capsys, tmp_path, finished_run, damage) -> None:
    folder, config = _crashed_copy(finished_run, tmp_path)
    newest, older = complete_checkpoints(folder)[-1], complete_checkpoints(folder)[-2]
    damage(newest / "trainable.safetensors")
    with pytest.warns(UserWarning, match=f"resuming from {older.name}: {newest.name} is damaged"):
        code, out, err = run(capsys, "train", config)
    assert code == 0, err
    assert f"resumed from {older}" in out
    straight = [r["train/loss"] for r in read_metrics(finished_run[0] / "run") if "train/loss" in r]
    again = [r["train/loss"] for r in read_metrics(folder) if "train/loss" in r]
    assert again[-2:] == pytest.approx(straight[-2:], abs=1e-6)  # steps 3 and 4, trained again, as before


def test_resuming_a_damaged_checkpoint_by_path_fails_in_one_line(capsys, tmp_path, finished_run) -> None:
    folder, _ = _crashed_copy(finished_run, tmp_path)
    newest = complete_checkpoints(folder)[-1]
    _flip(newest / "optimizer.pt")
    config = write_config(tmp_path, Path("unused"), name="run", resume=str(newest))
    raw = yaml.safe_load(config.read_text())
    raw["model"]["name_or_path"] = yaml.safe_load((finished_run[0] / "run.yaml").read_text())["model"][
        "name_or_path"
    ]
    config.write_text(yaml.safe_dump(raw))
    code, _, err = run(capsys, "train", config)
    one_line_error(code, err, f"checkpoint {newest} is damaged", "optimizer.pt")


def test_keep_last_null_keeps_every_checkpoint(finished_run) -> None:
    assert [p.name for p in complete_checkpoints(finished_run[0] / "run")] == [
        "step-00000002",
        "step-00000004",
    ]


def test_an_adapter_folder_is_a_warm_start(capsys, tmp_path, finished_run) -> None:
    """train.resume at an adapter folder (as MFTCoder's step_N): its weights, a fresh optimizer and step 0."""
    source, config = finished_run
    raw = yaml.safe_load(config.read_text())
    raw["train"] |= {
        "output_dir": str(tmp_path / "warm"),
        "resume": str(source / "run" / "final"),
        "max_steps": 2,
    }
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump(raw))
    code, out, err = run(capsys, "train", tmp_path / "warm.yaml")
    assert code == 0, err
    assert "warm start from the adapter" in out
    start = next(r for r in read_metrics(tmp_path / "warm") if r["step"] == 0 and "valid/loss" in r)
    end = [r for r in read_metrics(source / "run") if "valid/loss" in r][-1]
    assert start["valid/loss"] == pytest.approx(end["valid/loss"], abs=1e-5)  # the adapter's own loss


# --- merge ---------------------------------------------------------------------------------------


def test_merge_refuses_to_write_into_the_adapter_or_a_full_folder(capsys, tmp_path, finished_run) -> None:
    run_dir = finished_run[0] / "run"
    for out in (run_dir / "final", run_dir / "final" / "merged"):
        code, _, err = run(capsys, "merge", run_dir, "--out", out)
        one_line_error(code, err, "is the adapter's own folder")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "merge", run_dir, "--out", occupied)
    one_line_error(code, err, "is not empty", "--overwrite")
    assert (occupied / "notes.txt").read_text() == "mine" and len(list(occupied.iterdir())) == 1
    assert run(capsys, "merge", run_dir, "--out", occupied, "--overwrite")[0] == 0
    assert (occupied / "config.json").is_file()


# --- one-line errors before training -----------------------------------------------------------------


def test_a_missing_model_folder(capsys, tmp_path) -> None:
    config = write_config(tmp_path, tmp_path / "no-such-model")
    for command in ("train", "data validate"):
        code, _, err = run(capsys, *command.split(), config)
        one_line_error(code, err, "model.name_or_path", "does not exist")
    assert not (tmp_path / "run").exists()


def test_a_hub_name_offline(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(
        capsys,
        "data",
        "validate",
        write_config(tmp_path, Path("org/not-here")),
        "model.name_or_path=org/not-here",
    )
    one_line_error(code, err, "cannot load 'org/not-here'", "offline")


def test_flash_attention_without_flash_attn(capsys, tmp_path, tiny_model_dir) -> None:
    if importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed")
    code, _, err = run(
        capsys, "train", write_config(tmp_path, tiny_model_dir), "model.attention=flash_attention_2"
    )
    one_line_error(code, err, "model.attention flash_attention_2 needs flash_attn", "model.attention: auto")
    assert not (tmp_path / "run").exists()


def test_qlora_without_bitsandbytes(capsys, tmp_path, tiny_model_dir, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    code, _, err = run(capsys, "train", write_config(tmp_path, tiny_model_dir), "finetune.method=qlora")
    one_line_error(code, err, "needs bitsandbytes")


def test_an_output_folder_that_cannot_be_written(capsys, tmp_path, tiny_model_dir) -> None:
    (tmp_path / "a-file").write_text("x")
    config = write_config(tmp_path, tiny_model_dir)
    code, _, err = run(capsys, "train", config, f"train.output_dir={tmp_path / 'a-file' / 'run'}")
    one_line_error(code, err, "cannot write there")


def test_generate_lists_every_bad_line(capsys, tmp_path, tiny_model_dir) -> None:
    lines = ['{"prompt": "fine"}', "not json", '{"messages": "no"}', "", '{"prompt": 3}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    code, _out, err = run(
        capsys,
        "generate",
        tiny_model_dir,
        "--input",
        tmp_path / "in.jsonl",
        "--output",
        tmp_path / "out.jsonl",
    )
    assert code == 2 and "3 bad line(s)" in err
    for number in (2, 3, 5):
        assert f"in.jsonl:{number}:" in err
    assert not (tmp_path / "out.jsonl").exists()
