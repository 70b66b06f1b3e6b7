"""Every shipped example config validates and trains a few steps, writing what a run promises."""

from pathlib import Path

import pytest

from mftune.cli import main

CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").iterdir() if p.suffix in {".yaml", ".json"}
)
PROMISED = ["resolved_config.yaml", "environment.json", "metrics.jsonl", "final", "checkpoints"]


def test_there_are_example_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "coba.yaml", "mftcoder_compat.json"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_example_config_trains(config, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(config),
            f"model.name_or_path={tiny_model_dir}",
            f"train.output_dir={out}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.num_proc=1",
            "train.max_steps=2",
            "train.eval_every=1",
            "train.tensorboard=false",
            "train.plots=false",
        ]
    )
    assert code == 0
    for name in PROMISED:
        assert (out / name).exists(), name
    final = out / "final"
    assert (final / "tokenizer.json").exists() and (final / "chat_template.jinja").exists()
    assert any(final.glob("*.safetensors"))
