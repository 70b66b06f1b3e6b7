"""The shipped tokenizer, example data and tiny models: reproducible, well-formed and correct."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from mftune.tiny import TINY_ARCHITECTURES, TOKENIZER_FILES, VOCAB_SIZE, build_tiny_model, build_tokenizer
from mftune.tiny.examples import FUNCTION_TEMPLATES, NUM_HELDOUT, TASK_SIZES, generate_task, write_examples

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _train(task: str) -> list[dict]:
    return _read_jsonl(EXAMPLES / "data" / task / "train.jsonl")


def _heldout(task: str) -> list[dict]:
    return _read_jsonl(EXAMPLES / "heldout" / f"{task}.jsonl")


# ------------------------------------------------------------------ tokenizer
def test_tokenizer_rebuild_is_byte_identical_to_both_committed_copies(tmp_path, tokenizer_dir):
    build_tokenizer(tmp_path)
    for committed in (REPO / "assets" / "tokenizer", tokenizer_dir):
        assert sorted(p.name for p in committed.iterdir()) == sorted(TOKENIZER_FILES)
        for name in TOKENIZER_FILES:
            assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), f"{committed}/{name}"


def test_tokenizer_special_tokens_are_single_tokens_inside_text(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    for special in ("<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        ids = tokenizer(f"x = 1{special}def f(): pass", add_special_tokens=False)["input_ids"]
        assert ids.count(tokenizer.convert_tokens_to_ids(special)) == 1, special
    assert (
        tokenizer("hello", add_special_tokens=True)["input_ids"]
        == tokenizer("hello", add_special_tokens=False)["input_ids"]
    )


def test_tokenizer_offsets_tile_the_text_and_decode_round_trips(tokenizer):
    for text in ("hello", "def square(x): return x * x\n", "  two  spaces\n\n"):
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        # Untrimmed offsets: each token's span starts where the previous one ended.
        starts, ends = zip(*enc["offset_mapping"], strict=True)
        assert starts == (0, *ends[:-1]) and ends[-1] == len(text)
        assert tokenizer.decode(enc["input_ids"]) == text
    # Byte-level BPE splits a multi-byte character into several tokens that share its span.
    text = "Évaluer → 11"
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert sorted(enc["offset_mapping"]) == enc["offset_mapping"] and enc["offset_mapping"][-1][1] == len(
        text
    )
    assert tokenizer.decode(enc["input_ids"]) == text


def test_chat_template_masks_exactly_the_assistant_replies(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "2<|im_end|>4<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------ example data: reproducibility
def test_example_generator_is_deterministic_and_matches_committed_files(tmp_path):
    first = write_examples(tmp_path / "a")
    second = write_examples(tmp_path / "b")
    assert len(first) == 2 * len(TASK_SIZES)
    for a, b in zip(first, second, strict=True):
        relative = a.relative_to(tmp_path / "a")
        assert a.read_bytes() == b.read_bytes() == (EXAMPLES / relative).read_bytes(), relative


def test_heldout_and_train_prefix_do_not_depend_on_size_and_seed_matters():
    small_train, small_heldout = generate_task("list_ops", 20)
    big_train, big_heldout = generate_task("list_ops", 200)
    assert small_heldout == big_heldout and big_train[:20] == small_train
    assert generate_task("list_ops", 20, seed=1) != (small_train, small_heldout)


# ------------------------------------------------------------------ example data: shape
def _user_answer_pairs(task: str, record: dict) -> list[tuple[str, str]]:
    """(user text, assistant reply) pairs read straight from the record's declared format."""
    if task == "arithmetic":
        turns = [r for r in record["chat_rounds"] if r["role"] != "system"]
        return [(h["content"], b["content"]) for h, b in zip(turns[::2], turns[1::2], strict=True)]
    if task == "list_ops":
        turns = [m for m in record["messages"] if m["role"] != "system"]
        return [(turns[0]["content"], turns[1]["content"])]
    if task == "write_function":
        turns = [c for c in record["conversations"] if c["from"] != "system"]
        return [(turns[0]["value"], turns[1]["value"])]
    return [(f"{record['instruction']}\n{record['input']}", record["output"])]


def test_train_files_have_their_declared_formats():
    for record in _train("arithmetic"):
        assert set(record) == {"id", "data_name", "chat_rounds"} and record["data_name"] == "arithmetic"
        roles = [r["role"] for r in record["chat_rounds"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["human", "bot"] * (len(body) // 2) and body
    for record in _train("list_ops"):
        roles = [m["role"] for m in record["messages"]]
        assert set(record) == {"messages"} and roles in (
            ["user", "assistant"],
            ["system", "user", "assistant"],
        )
    for record in _train("write_function"):
        roles = [c["from"] for c in record["conversations"]]
        assert set(record) == {"conversations"} and roles in (["human", "gpt"], ["system", "human", "gpt"])
    for record in _train("write_test"):
        assert set(record) == {"instruction", "input", "output"}
    for task in TASK_SIZES:
        for record in _heldout(task):
            assert set(record) == {"task", "messages", "answer"} and record["task"] == task
            assert record["messages"][-1]["role"] == "user" and record["answer"]


def test_task_sizes_are_unequal_and_arithmetic_mixes_multi_turn_and_system():
    sizes = {task: len(_train(task)) for task in TASK_SIZES}
    assert sizes == TASK_SIZES
    assert max(sizes.values()) >= 10 * min(sizes.values())
    assert all(len(_heldout(task)) == NUM_HELDOUT for task in TASK_SIZES)
    rounds = [len(_user_answer_pairs("arithmetic", r)) for r in _train("arithmetic")]
    assert 0.2 < sum(n > 1 for n in rounds) / len(rounds) < 0.4 and max(rounds) == 3
    with_system = sum(r["chat_rounds"][0]["role"] == "system" for r in _train("arithmetic"))
    assert with_system > len(rounds) / 2


def test_heldout_prompts_never_appear_in_train():
    for task in TASK_SIZES:
        train_text = "\n".join(u for r in _train(task) for u, _ in _user_answer_pairs(task, r))
        prompts = [r["messages"][-1]["content"] for r in _heldout(task)]
        assert len(set(prompts)) == len(prompts)
        leaked = [p for p in prompts if p in train_text]
        assert not leaked, f"{task}: {leaked[:3]}"
        # The underlying problems (the backticked expression) are disjoint too, not only the phrasing.
        if task in ("arithmetic", "list_ops"):
            train_exprs = set(re.findall(r"`([^`]+)`", train_text))
            assert not {re.search(r"`([^`]+)`", p)[1] for p in prompts} & train_exprs


# ------------------------------------------------------------------ example data: answers are right
def _all_pairs(task: str) -> list[tuple[str, str]]:
    pairs = [pair for r in _train(task) for pair in _user_answer_pairs(task, r)]
    return pairs + [(r["messages"][-1]["content"], r["answer"]) for r in _heldout(task)]


def test_arithmetic_answers_are_correct():
    for prompt, answer in _all_pairs("arithmetic"):
        expr = re.search(r"`([^`]+)`", prompt)[1]
        assert re.fullmatch(r"\d+( [-+*] \d+){1,2}", expr) and max(map(int, re.findall(r"\d+", expr))) <= 20
        assert eval(expr) == int(answer), prompt


def test_list_ops_answers_are_the_repr_of_the_result():
    for prompt, answer in _all_pairs("list_ops"):
        expr = re.search(r"`([^`]+)`", prompt)[1]
        assert repr(eval(expr)) == answer, prompt


_INPUTS = {
    "x": [(-7,), (0,), (3,), (12,), (25,)],
    "a, b": [(2, 3), (-4, 9), (5, 5)],
    "s": [("",), ("abc",), ("Hello",)],
    "xs": [([3, 1, 2],), ([5],), ([0, -2, 7, 7],)],
}


def _template_for(params: str, described: str):
    matches = []
    for template in FUNCTION_TEMPLATES:
        pattern = re.escape(template.describes).replace(re.escape("{c}"), r"(\d+)")
        m = re.fullmatch(pattern, described)
        if template.params == params and m:
            matches.append((template, int(m[1]) if m.groups() else 0))
    assert len(matches) == 1, described
    return matches[0]


def test_write_function_answers_behave_as_described():
    for prompt, answer in _all_pairs("write_function"):
        name, params, described = re.fullmatch(
            r"Write a .*`(\w+)\((.*)\)` (?:that returns|returning) (.+)\.", prompt
        ).groups()
        template, c = _template_for(params, described)
        assert answer.startswith(f"def {name}({params}): return ") and "\n" not in answer
        namespace: dict = {}
        exec(answer, namespace)
        for args in _INPUTS[params]:
            got, want = namespace[name](*args), template.reference(c)(*args)
            assert got == want and type(got) is type(want), (answer, args)


def test_write_test_answers_pass_and_compare_with_the_true_value():
    for prompt, answer in _all_pairs("write_test"):
        instruction, code = prompt.split("\n")
        args = re.fullmatch(r".* with (.+)\.", instruction)[1]
        name = re.match(r"def (\w+)\(", code)[1]
        call, expected = re.fullmatch(r"assert (.+) == (.+)", answer).groups()
        assert call == f"{name}({args})"
        namespace: dict = {}
        exec(code, namespace)
        exec(answer, namespace)  # the test passes
        assert eval(call, namespace) == ast.literal_eval(expected)


# ------------------------------------------------------------------ tiny models
def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("def f(x): return x + 1<|im_end|>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_model_round_trips_through_from_pretrained(arch, tmp_path, tokenizer_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = build_tiny_model(tmp_path / arch, arch, tokenizer_dir=tokenizer_dir, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == arch and config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.dtype == torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert torch.equal(_logits(loaded, tokenizer), _logits(fresh, tokenizer))


def test_tiny_model_is_reproducible_and_seeded(tmp_path, tokenizer_dir):
    a = build_tiny_model(tmp_path / "a", tokenizer_dir=tokenizer_dir)
    state = torch.random.get_rng_state()
    b = build_tiny_model(tmp_path / "b", tokenizer_dir=tokenizer_dir)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    c = build_tiny_model(tmp_path / "c", tokenizer_dir=tokenizer_dir, seed=1)
    weights = [(d / "model.safetensors").read_bytes() for d in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]


def test_tiny_llama_uses_grouped_query_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.out_features == config.num_key_value_heads * config.head_dim
    assert attention.q_proj.out_features == config.num_attention_heads * config.head_dim
    assert not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_tiny_architectures_have_distinct_projection_names(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    names = {}
    for arch in ("gpt_neox", "phi3"):
        model = AutoModelForCausalLM.from_pretrained(
            build_tiny_model(tmp_path / arch, arch, tokenizer_dir=tokenizer_dir)
        )
        names[arch] = {n.rsplit(".", 2)[-2] for n, _ in model.named_parameters()}
    assert {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} <= names["gpt_neox"]
    assert {"qkv_proj", "gate_up_proj", "o_proj"} <= names["phi3"]
