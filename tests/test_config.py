"""The typed config: strict validation with useful messages, overrides, paths, dumping, docs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from mftune.config import (
    LOSS_ALIASES,
    Config,
    ConfigError,
    config_reference_markdown,
    config_to_dict,
    dump_config,
    load_config,
)
from mftune.config.mftcoder import mftcoder_reference_markdown

REPO = Path(__file__).resolve().parents[1]


def _minimal() -> dict[str, Any]:
    return {"model": {"name_or_path": "org/tiny-model"}, "data": {"tasks": {"a": {"path": "data/a"}}}}


def _write(folder: Path, raw: dict[str, Any] | str, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(raw, str):
        path.write_text(raw)
    elif name.endswith(".json"):
        path.write_text(json.dumps(raw))
    else:
        path.write_text(yaml.safe_dump(raw))
    return path


def _error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --- strictness and messages -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "typo", "message"),
    [
        ("data", "max_seq_length", "unknown key 'data.max_seq_length' — did you mean 'data.max_seq_len'?"),
        ("train", "lerning_rate", "unknown key 'train.lerning_rate' — did you mean 'train.learning_rate'?"),
    ],
)
def test_typo_names_dotted_path_and_suggests(tmp_path: Path, section: str, typo: str, message: str) -> None:
    raw = _minimal()
    raw.setdefault(section, {})[typo] = 1
    path = _write(tmp_path, raw)
    error = _error(path)
    assert message in error
    assert str(path) in error


def test_typo_inside_a_task(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["tasks"]["a"] = {"pathh": "data/a"}
    error = _error(_write(tmp_path, raw))
    assert "unknown key 'data.tasks.a.pathh' — did you mean 'data.tasks.a.path'?" in error
    assert "data.tasks.a.path: required" in error


def test_unknown_top_level_section(tmp_path: Path) -> None:
    raw = _minimal() | {"trian": {"epochs": 2}}
    assert "did you mean 'train'?" in _error(_write(tmp_path, raw))


def test_bad_literal_lists_allowed_values(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["packing"] = "sometimes"
    error = _error(_write(tmp_path, raw))
    line = next(line for line in error.splitlines() if "data.packing" in line)
    assert "'sometimes'" in line
    for allowed in ("'none'", "'isolated'", "'contiguous'"):
        assert allowed in line


def test_every_error_reported_one_per_line(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["max_seq_len"] = 2
    raw["train"] = {"epochs": -1, "lr_schedule": "step"}
    lines = _error(_write(tmp_path, raw)).splitlines()
    for path in ("data.max_seq_len", "train.epochs", "train.lr_schedule"):
        assert sum(path in line for line in lines) == 1


@pytest.mark.parametrize(
    ("train", "path"),
    [
        ({"micro_batch_size": 3, "global_batch_size": 8}, "train.global_batch_size"),
        ({"learning_rate": 1e-4, "min_lr": 1e-3}, "train.min_lr"),
        ({"warmup_steps": 10, "warmup_ratio": 0.1}, "train.warmup_ratio"),
    ],
)
def test_cross_field_checks_name_the_field(tmp_path: Path, train: dict[str, Any], path: str) -> None:
    raw = _minimal() | {"train": train}
    assert f"{path}:" in _error(_write(tmp_path, raw))


def test_jinja_template_needs_a_file(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["template"] = {"kind": "jinja"}
    assert "data.template.jinja_file: required" in _error(_write(tmp_path, raw))


def test_empty_tasks_rejected(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["tasks"] = {}
    assert "data.tasks" in _error(_write(tmp_path, raw))


@pytest.mark.parametrize(("alias", "loss"), sorted(LOSS_ALIASES.items()))
def test_mftcoder_loss_aliases(tmp_path: Path, alias: str, loss: str) -> None:
    raw = _minimal() | {"train": {"loss": alias}}
    assert load_config(_write(tmp_path, raw)).train.loss == loss


def test_loss_alias_table_is_mftcoders() -> None:
    assert LOSS_ALIASES == {"case1": "token", "case2": "sample", "case3": "task", "case4": "task_sample"}


def test_yaml_on_off_read_as_booleans_still_work(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: {name_or_path: m, gradient_checkpointing: off}\ndata: {tasks: [x]}\n")
    assert load_config(path).model.gradient_checkpointing == "off"


# --- overrides ---------------------------------------------------------------------------------


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, _minimal()),
        [
            "data.max_seq_len=512",
            "model.trust_remote_code=true",
            "finetune.lora.target_modules=[q_proj, v_proj]",
            "train.learning_rate=1e-4",
            "train.max_steps=null",
            'data.template.role_markers.user="### Instruction:\\n"',
            "data.template.role_markers.assistant=### Response:",
        ],
    )
    assert cfg.data.max_seq_len == 512
    assert cfg.model.trust_remote_code is True
    assert cfg.finetune.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.max_steps is None
    assert cfg.data.template.role_markers.user == "### Instruction:\n"
    assert cfg.data.template.role_markers.assistant == "### Response:"  # not a YAML comment


def test_overrides_are_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal())
    assert "did you mean 'data.max_seq_len'?" in _error(path, ("data.max_seq_length=512",))
    assert "data.max_seq_len" in _error(path, ("data.max_seq_len=big",))
    assert "key.path=value" in _error(path, ("data.max_seq_len",))
    assert "data.max_seq_len is not a section" in _error(path, ("data.max_seq_len=8", "data.max_seq_len.x=1"))


def test_override_adds_a_task_relative_to_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "configs", _minimal())
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["data.tasks.extra.path=more/extra", "data.tasks.extra.loss_weight=2"])
    assert set(cfg.data.tasks) == {"a", "extra"}
    assert cfg.data.tasks["extra"].path == str(tmp_path / "more" / "extra")
    assert cfg.data.tasks["extra"].loss_weight == 2.0
    assert cfg.data.tasks["a"].path == str(tmp_path / "configs" / "data" / "a")


# --- tasks and paths ---------------------------------------------------------------------------


def test_task_list_named_after_folders(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["tasks"] = [
        "data/completion",
        {"path": "data/qa/"},
        {"path": "x/test.jsonl", "name": "unit_tests"},
    ]
    cfg = load_config(_write(tmp_path, raw))
    assert list(cfg.data.tasks) == ["completion", "qa", "unit_tests"]
    assert cfg.data.tasks["qa"].path == str(tmp_path / "data" / "qa")


def test_task_list_with_duplicate_names_names_both_paths(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["tasks"] = ["one/code", "two/code"]
    error = _error(_write(tmp_path, raw))
    assert "data.tasks: two tasks are named 'code': one/code and two/code" in error


def test_bad_task_name(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["tasks"] = {"my task": {"path": "x"}}
    assert "data.tasks.my task:" in _error(_write(tmp_path, raw))


def test_relative_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models" / "local").mkdir(parents=True)
    raw = {
        "model": {"name_or_path": "../models/local", "tokenizer": "org/tokenizer"},
        "data": {
            "tasks": {"a": {"path": "../data/a", "valid_path": "valid/a.jsonl"}},
            "template": {"kind": "jinja", "jinja_file": "chat.jinja"},
        },
        "train": {"output_dir": "../runs/x", "resume": "ckpt/step-10"},
    }
    path = _write(tmp_path / "configs", raw)
    monkeypatch.chdir(tmp_path / "models")  # the working folder must not matter
    cfg = load_config(path)
    configs = tmp_path / "configs"
    assert cfg.model.name_or_path == str(tmp_path / "models" / "local")
    assert cfg.model.tokenizer == "org/tokenizer"  # a hub name stays a name
    assert cfg.data.tasks["a"].path == str(tmp_path / "data" / "a")
    assert cfg.data.tasks["a"].valid_path == str(configs / "valid" / "a.jsonl")
    assert cfg.data.template.jinja_file == str(configs / "chat.jinja")
    assert cfg.train.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.train.resume == str(configs / "ckpt" / "step-10")
    assert cfg.data.cache_dir == str(configs / ".mftune_cache")  # defaults too


def test_unreadable_files(tmp_path: Path) -> None:
    assert "config.yaml" in _error(tmp_path / "config.yaml")
    assert ".toml" in _error(_write(tmp_path, "x = 1", name="config.toml"))
    assert "config.json:1:" in _error(_write(tmp_path, "{oops", name="config.json"))
    assert "mapping" in _error(_write(tmp_path, "- a\n- b\n"))


# --- dumping -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.yaml", "train.json"])
def test_dump_then_load_is_identity(tmp_path: Path, name: str) -> None:
    mftcoder = {"data_paths": "[data/a,data/b]", "pretrained_model_path": "org/base", "output_dir": "out"}
    raw = mftcoder if name.endswith(".json") else _minimal()
    cfg = load_config(_write(tmp_path / "src", raw, name=name), ["train.loss=coba", "coba.floor=0.01"])
    dumped = tmp_path / "run" / "resolved_config.yaml"
    dump_config(cfg, dumped)
    again = load_config(dumped)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


# --- documentation -----------------------------------------------------------------------------


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        annotation = field.annotation
        if get_origin(annotation) is dict:
            paths += _field_paths(get_args(annotation)[1], f"{path}.<name>.")
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _field_paths(annotation, f"{path}.")
    return paths


def test_docs_cover_every_field() -> None:
    docs = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    paths = _field_paths(Config)
    assert len(paths) > 70
    missing = [path for path in paths if f"`{path}`" not in docs]
    assert not missing, f"docs/config.md lacks {missing}"


def test_docs_reference_is_current() -> None:
    regenerate = "regenerate with: python scripts/regenerate_docs.py"
    assert config_reference_markdown() in (REPO / "docs" / "config.md").read_text(encoding="utf-8"), (
        regenerate
    )
    compat = (REPO / "docs" / "mftcoder-compat.md").read_text(encoding="utf-8")
    assert mftcoder_reference_markdown() in compat


def test_every_field_is_described() -> None:
    def undescribed(model: type[BaseModel]) -> list[str]:
        out = [
            f"{model.__name__}.{n}"
            for n, f in model.model_fields.items()
            if not (f.description or "").strip()
        ]
        for field in model.model_fields.values():
            for sub in (field.annotation, *get_args(field.annotation)):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    out += undescribed(sub)
        return out

    assert undescribed(Config) == []


def test_sampling_weights_on_some_tasks_only_are_refused(tmp_path: Path) -> None:
    raw = _minimal()
    raw["data"]["tasks"]["b"] = {"path": "data/b", "sampling_weight": 2.0}
    message = _error(_write(tmp_path, raw))
    assert "data.tasks.a.sampling_weight" in message and "set for b but not for a" in message
    raw["data"]["tasks"]["a"]["sampling_weight"] = 1.0
    assert load_config(_write(tmp_path, raw)).data.tasks["a"].sampling_weight == 1.0
