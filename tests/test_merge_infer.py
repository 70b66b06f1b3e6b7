"""After training: merge an adapter (merged == unmerged), batch generation, the chat loop, their CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mftune.cli import main
from mftune.config.schema import FinetuneConfig, LoraConfig, ModelConfig
from mftune.data.templates import RoleMarkersTemplate
from mftune.export import merge_adapter
from mftune.infer import generate_batch, generate_file, load_for_inference, run_chat, stop_token_ids
from mftune.infer.chat import chat_loop
from mftune.model import load_model

CONVERSATIONS = [
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "And three plus three, written out in words please?"},
    ],
]
# A template unlike the base tokenizer's ChatML, to show the adapter folder's is the one carried along.
TRAINING_TEMPLATE = RoleMarkersTemplate("<s>system\n", "<s>human\n", "<s>bot\n", "</s>").chat_template()


def _save_adapter(base_dir: Path, out: Path, method: str) -> Path:
    """A LoRA/DoRA adapter with nonzero B (not a no-op), saved as training saves it."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = load_model(
        ModelConfig(name_or_path=str(base_dir)),
        FinetuneConfig(method=method, lora=LoraConfig(r=4, alpha=8)),
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = TRAINING_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A LoRA adapter on the tiny llama."""
    return _save_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), "lora")


@pytest.fixture(scope="session")
def merged_dir(tmp_path_factory: pytest.TempPathFactory, adapter_dir: Path) -> Path:
    return merge_adapter(adapter_dir, tmp_path_factory.mktemp("merged"), max_shard_size="1MB")


@pytest.fixture(scope="session")
def tiny_chat(tiny_model_dir: Path):
    """The tiny llama and its tokenizer (ChatML template), loaded for inference."""
    return load_for_inference(tiny_model_dir, device="cpu")


def _logits(model_dir: Path) -> torch.Tensor:
    model, tokenizer = load_for_inference(model_dir, device="cpu", dtype="float32")
    ids = tokenizer("merged equals unmerged, token by token", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_folder_points_at_its_base(adapter_dir: Path, tiny_model_dir: Path) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == tiny_model_dir
    assert (adapter_dir / "adapter_model.safetensors").is_file()


def test_merged_logits_equal_adapter_logits(
    adapter_dir: Path, merged_dir: Path, tiny_model_dir: Path
) -> None:
    adapter, merged = _logits(adapter_dir), _logits(merged_dir)
    torch.testing.assert_close(merged, adapter, atol=1e-5, rtol=1e-5)
    assert (adapter - _logits(tiny_model_dir)).abs().max() > 1e-2  # the adapter is not a no-op


def test_merged_dora_logits_equal_adapter_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = _save_adapter(tiny_model_dir, tmp_path / "dora", "dora")
    merged = merge_adapter(adapter, tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), _logits(adapter), atol=1e-5, rtol=1e-5)


def test_merged_folder_is_sharded_safetensors_with_the_training_template(merged_dir: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    files = {p.name for p in merged_dir.iterdir()}
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    assert "adapter_config.json" not in files
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template == TRAINING_TEMPLATE
    eos = GenerationConfig.from_pretrained(merged_dir).eos_token_id
    assert {1, 5} <= set(eos)  # </s> (the training template's stop) and the base's <|im_end|>


def test_merge_cli_takes_a_run_folder(adapter_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(adapter_dir, tmp_path / "run" / "final")
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_merge_refuses_a_full_model(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        merge_adapter(tiny_model_dir, tmp_path / "out")
    assert main(["merge", str(tiny_model_dir), "--out", str(tmp_path / "out")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err


def test_adapter_folder_loads_unmerged_in_eval_mode(adapter_dir: Path) -> None:
    from peft import PeftModel

    model, tokenizer = load_for_inference(adapter_dir, device="cpu")
    assert isinstance(model, PeftModel) and not model.training
    assert tokenizer.chat_template == TRAINING_TEMPLATE


def test_stop_tokens_include_the_templates_turn_end(tiny_chat, tokenizer_dir: Path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    model, chatml = tiny_chat
    monkeypatch.setattr(model.generation_config, "eos_token_id", chatml.eos_token_id)
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(model, chatml) == [chatml.eos_token_id, im_end]
    role_markers = AutoTokenizer.from_pretrained(tokenizer_dir)
    role_markers.chat_template = TRAINING_TEMPLATE  # closes turns with </s>, the EOS
    assert stop_token_ids(model, role_markers) == [chatml.eos_token_id]


def test_generate_batch_is_deterministic_and_batch_independent(tiny_chat) -> None:
    model, tokenizer = tiny_chat
    batched = generate_batch(model, tokenizer, CONVERSATIONS, max_new_tokens=8, batch_size=2)
    assert generate_batch(model, tokenizer, CONVERSATIONS, max_new_tokens=8, batch_size=3) == batched
    one_by_one = [generate_batch(model, tokenizer, [c], max_new_tokens=8)[0] for c in CONVERSATIONS]
    assert batched == one_by_one
    assert any(batched)
    assert tokenizer.padding_side == "right"  # restored


def test_generate_feeds_the_chat_template_ids(tiny_chat, tokenizer_dir: Path, monkeypatch) -> None:
    from tokenizers import processors
    from transformers import AutoTokenizer

    model, _ = tiny_chat
    # A tokenizer that adds BOS by itself, as many do: the template's text must not get a second one.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]),
        ]
    )
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    fed: list[list[int]] = []
    original = model.generate

    def spy(**kwargs):
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True):
            assert mask[0] == 0 or mask.all()  # left padding
            fed.append(ids[mask.bool()].tolist())
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_batch(model, tokenizer, CONVERSATIONS, max_new_tokens=2, batch_size=3)
    expected = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True)["input_ids"] for c in CONVERSATIONS
    ]
    assert sorted(fed) == sorted(expected)


def test_generate_file_keeps_records(tiny_chat, tiny_model_dir: Path, tmp_path: Path) -> None:
    records = [
        {"id": 7, "messages": CONVERSATIONS[0], "meta": {"task": "colours"}},
        {"id": 8, "prompt": "hi"},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert generate_file(tiny_model_dir, source, tmp_path / "out.jsonl", max_new_tokens=6, device="cpu") == 2
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k != "output"} for w in written] == records
    model, tokenizer = tiny_chat
    prompt_form = [{"role": "user", "content": "hi"}]
    assert [w["output"] for w in written] == generate_batch(
        model, tokenizer, [CONVERSATIONS[0], prompt_form], max_new_tokens=6
    )


def test_generate_cli_with_an_adapter(adapter_dir: Path, tmp_path: Path, capsys) -> None:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        json.dumps({"prompt": "hello"}) + "\n\n" + json.dumps({"messages": CONVERSATIONS[2]}) + "\n"
    )
    assert main(["generate", str(adapter_dir), "--input", str(source), "--output", str(target),
                 "--max-new-tokens", "4", "--batch-size", "2"]) == 0  # fmt: skip
    assert [set(json.loads(line)) for line in target.read_text().splitlines()] == [
        {"prompt", "output"},
        {"messages", "output"},
    ]
    source.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    assert main(["generate", str(adapter_dir), "--input", str(source), "--output", str(target)]) == 2
    assert "in.jsonl:2" in capsys.readouterr().err


def test_chat_keeps_history_and_resets(tiny_chat, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_chat
    opening = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"}]
    first_reply = generate_batch(model, tokenizer, [opening], max_new_tokens=6)[0]
    assert first_reply
    prompts: list[str] = []
    original = model.generate

    def spy(**kwargs):
        prompts.append(tokenizer.decode(kwargs["input_ids"][0]))
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    printed: list[str] = []
    lines = iter(["first question", "second question", "/reset", "third question", "/exit", "never read"])
    history = run_chat(
        model,
        tokenizer,
        system="Be brief.",
        max_new_tokens=6,
        input_fn=lambda _: next(lines),
        print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))),
    )
    assert next(lines) == "never read"  # stopped at /exit
    assert len(prompts) == 3
    assert "first question" in prompts[1] and first_reply in prompts[1]
    assert "first question" not in prompts[2] and "Be brief." in prompts[2]
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "third question"
    assert first_reply in "".join(printed)


def test_chat_loop_from_a_folder_ends_on_eof(tiny_model_dir: Path) -> None:
    def no_more_input(_: str) -> str:
        raise EOFError

    assert (
        chat_loop(tiny_model_dir, input_fn=no_more_input, print_fn=lambda *a, **k: None, device="cpu") == []
    )
