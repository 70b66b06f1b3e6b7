"""The model matrix: every family × every check of `mftune.tiny.matrix`, and proof each check can fail.

Families share their tiny models through one session folder. docs/models.md must agree with the run.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch

from mftune.model.load import AttentionLimits, attention_limits, resolve_attention
from mftune.tiny import TINY_FAMILIES, matrix
from mftune.tiny.matrix import CHECKS, EXPECTED_REFUSALS, run_check

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.fixture(scope="session")
def matrix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("matrix")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_check(family: str, check: str, matrix_dir: Path) -> None:
    status, reason = run_check(family, check, matrix_dir)
    if status == "skipped":
        pytest.skip(reason)
    expected = EXPECTED_REFUSALS.get((family, check))
    if expected is None:
        assert (status, reason) == ("ok", "")
    else:
        assert status == "refused", reason
        assert expected in reason


def test_docs_models_page_agrees_with_the_expected_matrix() -> None:
    rows = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(CHECKS) + 1 and cells[0] in TINY_FAMILIES:
            rows[cells[0]] = dict(zip(CHECKS, cells[1:], strict=True))
    assert set(rows) == set(TINY_FAMILIES), (
        "docs/models.md lacks a family: run scripts/model_matrix.py --write"
    )
    for family, row in rows.items():
        for check, mark in row.items():
            want = "refused" if (family, check) in EXPECTED_REFUSALS else "✓"
            assert mark == want, f"docs/models.md says {family} {check} {mark}; the matrix expects {want}"


# Each check must catch the bug it exists for: break the behaviour, and the check fails.


@pytest.mark.filterwarnings("ignore")
def test_packed_check_fails_when_packed_samples_attend_to_each_other(monkeypatch, matrix_dir: Path) -> None:
    from mftune.data.collate import collate_rows

    def leaking(rows):  # positions run on across the row: transformers then builds one causal mask
        batch = collate_rows(rows, pad_id=0, isolated=False)
        batch["packed"] = True
        return batch

    monkeypatch.setattr(matrix, "_batch", leaking)
    assert run_check("llama", "packed_equals_unpacked", matrix_dir)[0] == "failed"


@pytest.mark.filterwarnings("ignore")
def test_lora_target_check_fails_when_a_router_is_adapted(monkeypatch, matrix_dir: Path) -> None:
    import mftune.model.adapters as adapters

    monkeypatch.setattr(adapters, "router_modules", lambda model: [])
    status, reason = run_check("qwen2_moe", "lora_targets", matrix_dir)
    assert status == "failed" and "router" in reason


@pytest.mark.filterwarnings("ignore")
def test_generate_check_fails_with_right_padding(monkeypatch, matrix_dir: Path) -> None:
    @contextlib.contextmanager
    def right_padded(tokenizer):
        side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            yield
        finally:
            tokenizer.padding_side = side

    import mftune.infer.generate as generate

    monkeypatch.setattr(generate, "_left_padded", right_padded)
    assert run_check("llama", "generate", matrix_dir)[0] == "failed"


@pytest.mark.filterwarnings("ignore")
def test_merge_check_fails_when_the_merge_drops_the_adapter(monkeypatch, matrix_dir: Path) -> None:
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kwargs: self.unload())
    assert run_check("llama", "merge", matrix_dir)[0] == "failed"


# Attention backends each architecture allows, from transformers' own configs.


def _config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **overrides)


def test_attention_limits_follow_the_architecture() -> None:
    gemma2 = attention_limits(_config("gemma2"))
    assert (gemma2.sdpa, gemma2.softcapping, gemma2.sliding_window) == (False, True, 4096)
    assert attention_limits(_config("llama")) == AttentionLimits()
    # Qwen2 carries a sliding_window that no layer uses unless use_sliding_window is set.
    assert attention_limits(_config("qwen2", sliding_window=4096)).sliding_window is None
    assert attention_limits(_config("mistral", sliding_window=None)).sliding_window is None
    assert attention_limits(_config("mistral", sliding_window=512)).sliding_window == 512
    assert attention_limits(None) == AttentionLimits()


def test_auto_attention_keeps_off_what_a_model_cannot_run(monkeypatch) -> None:
    import mftune.model.load as load

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(load, "cuda_varlen_kernel_available", lambda device: device.type == "cuda")

    def auto(limits: AttentionLimits, max_seq_len: int = 4096) -> str:
        return resolve_attention(
            "auto", cuda, packing="isolated", dtype=bf16, limits=limits, max_seq_len=max_seq_len
        )

    assert auto(AttentionLimits()) == "mftune_varlen"
    assert auto(AttentionLimits(sdpa=False, softcapping=True)) == "eager"
    assert auto(AttentionLimits(sliding_window=1024)) == "sdpa"
    assert auto(AttentionLimits(sliding_window=4096), max_seq_len=4096) == "mftune_varlen"
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, limits=AttentionLimits(sdpa=False)) == "eager"


def test_explicit_attention_a_model_cannot_run_is_refused_in_one_line() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"^model\.attention sdpa: .*set model\.attention: auto"):
        resolve_attention("sdpa", cpu, limits=AttentionLimits(sdpa=False))
    with pytest.raises(ValueError, match="soft-caps"):
        resolve_attention("varlen", cpu, limits=AttentionLimits(softcapping=True))
    with pytest.raises(ValueError, match=re.escape("set data.max_seq_len <= 512")):
        resolve_attention("varlen", cpu, limits=AttentionLimits(sliding_window=512), max_seq_len=2048)
