"""The loss: chunked cross entropy and per-token task-weighting coefficients."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mftune.data.collate import Sample, collate_rows
from mftune.loss import (
    STRATEGIES,
    count_step,
    lm_head_loss,
    logit_transform,
    per_task_sums,
    reduce_counts,
    select_targets,
    token_coefficients,
    token_cross_entropy,
)

# --- chunked cross entropy -------------------------------------------------------------


def _problem(n: int = 10, h: int = 6, v: int = 13, *, frozen: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=not frozen)
    bias = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=not frozen)
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.rand(n, generator=gen, dtype=torch.float64)  # stands in for the coefficients
    return hidden, weight, bias, targets, upstream


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor | None]:
    grads = [t.grad.clone() if t.grad is not None else None for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


@pytest.mark.parametrize("chunk_size", [3, 10, 16])
def test_chunked_cross_entropy_matches_full_logits(chunk_size):
    hidden, weight, bias, targets, upstream = _problem()
    logits = hidden @ weight.T + bias
    expected = F.cross_entropy(logits, targets, reduction="none")
    (expected * upstream).sum().backward()
    expected_grads = _grads(hidden, weight, bias)

    loss, correct = token_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    (loss * upstream).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == (10,)
    torch.testing.assert_close(loss, expected.float())
    assert torch.equal(correct, logits.argmax(-1) == targets)
    assert not correct.requires_grad
    for got, want in zip(_grads(hidden, weight, bias), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_with_frozen_weight():
    hidden, weight, bias, targets, upstream = _problem(frozen=True)
    expected = F.cross_entropy(hidden @ weight.T + bias, targets, reduction="none")
    (expected * upstream).sum().backward()
    (want,) = _grads(hidden)

    loss, _ = token_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=4)
    (loss * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, want, rtol=1e-5, atol=1e-6)
    assert weight.grad is None and bias.grad is None


def test_chunked_cross_entropy_without_targets():
    hidden, weight, _, _, _ = _problem(n=0)
    loss, correct = token_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), chunk_size=4)
    assert loss.shape == (0,) and correct.shape == (0,) and correct.dtype == torch.bool
    loss.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_chunked_cross_entropy_under_no_grad():
    hidden, weight, bias, targets, _ = _problem()
    with torch.no_grad():
        loss, _ = token_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=3)
    expected = F.cross_entropy(hidden @ weight.T + bias, targets, reduction="none")
    torch.testing.assert_close(loss, expected.detach().float())


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_saved(fn) -> int:
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return largest


def test_saved_tensor_probe_sees_full_logits():
    # Control for the test below: the probe does catch logits kept for backward.
    n, v, h = 256, 32000, 64
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h)
    targets = torch.randint(0, v, (n,))
    assert _largest_saved(lambda: F.cross_entropy(hidden @ weight.T, targets)) >= n * v


def test_chunked_cross_entropy_never_holds_full_vocabulary_logits():
    n, v, h, chunk = 4096, 32000, 64, 512
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (n,))

    results = {}
    saved = _largest_saved(
        lambda: results.update(loss=token_cross_entropy(hidden, weight, targets, chunk_size=chunk))
    )
    assert saved < chunk * v  # only inputs are kept for backward, no logits
    with _LargestTensor() as probe:
        loss, _ = token_cross_entropy(hidden, weight, targets, chunk_size=chunk)
        loss.sum().backward()
    assert probe.largest == chunk * v  # a chunk's logits, in forward and in backward
    assert probe.largest < n * v
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# --- output head and logit scaling -----------------------------------------------------


def _with_transform(config):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, dtype=torch.float64)
    hidden = torch.randn(5, 8, dtype=torch.float64)
    targets = torch.randint(0, 11, (5,))
    loss, _ = lm_head_loss(head, hidden, targets, 2, config=config)
    return loss, head(hidden), targets


def test_lm_head_loss_plain_model():
    from transformers import LlamaConfig

    loss, logits, targets = _with_transform(LlamaConfig())
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, reduction="none").float())


def test_lm_head_loss_replays_logit_scaling():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    loss, logits, targets = _with_transform(Gemma2Config(final_logit_softcapping=2.0))
    capped = torch.tanh(logits / 2.0) * 2.0
    torch.testing.assert_close(loss, F.cross_entropy(capped, targets, reduction="none").float())

    loss, logits, targets = _with_transform(CohereConfig(logit_scale=0.25))
    torch.testing.assert_close(loss, F.cross_entropy(logits * 0.25, targets, reduction="none").float())

    loss, logits, targets = _with_transform(GraniteConfig(logits_scaling=4.0))
    torch.testing.assert_close(loss, F.cross_entropy(logits / 4.0, targets, reduction="none").float())


class _TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 11)


def _peft_head(**lora_kwargs) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_TwoLayers(), LoraConfig(r=2, **lora_kwargs)).base_model.model.head


def test_lm_head_loss_refuses_what_it_cannot_replay():
    from transformers import FalconH1Config

    with pytest.raises(NotImplementedError, match="falcon_h1"):
        logit_transform(FalconH1Config(lm_head_multiplier=0.5))
    with pytest.raises(NotImplementedError, match="adapters on the output head"):
        lm_head_loss(_peft_head(target_modules=["head"]), torch.randn(3, 8), torch.zeros(3, dtype=torch.long))


def test_lm_head_loss_trains_a_saved_head():
    head = _peft_head(target_modules=["body"], modules_to_save=["head"])
    hidden, targets = torch.randn(5, 8), torch.randint(0, 11, (5,))
    loss, _ = lm_head_loss(head, hidden, targets, 2)
    torch.testing.assert_close(loss, F.cross_entropy(head(hidden), targets, reduction="none"))
    loss.sum().backward()
    trained = [p for p in head.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


class _PartitionedHead(torch.nn.Module):
    """An output head whose `weight` and `bias` are, as under DeepSpeed ZeRO-3, empty outside its forward.

    The trained parameters are `full_weight` and `full_bias`; hooks put them in place for the head's own
    forward only, as ZeRO-3 gathers a module's parameters in its forward pre-hook (also when
    checkpointing recomputes) and frees them after. `calls` counts the forwards.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.full_weight = torch.nn.Parameter(linear.weight.detach().clone())
        self.full_bias = torch.nn.Parameter(linear.bias.detach().clone())
        self.calls = 0
        self._release()
        self.register_forward_pre_hook(lambda module, args: module._gather())
        self.register_forward_hook(lambda module, args, output: module._release())

    def _gather(self) -> None:
        self.calls += 1
        # Plain attributes, not registered parameters: `parameters()` yields only the full ones.
        self.__dict__.update(weight=self.full_weight, bias=self.full_bias)

    def _release(self) -> None:
        placeholder = torch.empty(0, dtype=self.full_weight.dtype)
        placeholder.ds_shape = self.full_weight.shape  # ZeRO-3 keeps the full shape here
        self.__dict__.update(weight=placeholder, bias=torch.empty(0, dtype=self.full_bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("num_targets", [10, 0])
def test_lm_head_loss_through_a_partitioned_head(num_targets):
    """A head whose weight exists only in its forward gives the same losses and gradients as nn.Linear."""
    from transformers import Gemma2Config

    config = Gemma2Config(final_logit_softcapping=2.0)
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 11, dtype=torch.float64)
    partitioned = _PartitionedHead(linear)
    hidden = torch.randn(num_targets, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (num_targets,))
    upstream = torch.rand(num_targets, dtype=torch.float64)

    results = []
    for head, weight, bias in (
        (linear, linear.weight, linear.bias),
        (partitioned, *partitioned.parameters()),
    ):
        loss, correct = lm_head_loss(head, hidden, targets, 3, config=config)
        (loss * upstream).sum().backward()
        results.append((loss, correct, *_grads(hidden, weight, bias)))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)
    assert results[1][3].shape == (11, 8)  # the weight's gradient, zeros without targets
    # Each chunk (4, or 1 empty one) calls the head in forward and again when backward recomputes it.
    assert partitioned.calls == (8 if num_targets else 2)
    assert partitioned.weight.numel() == 0
    with pytest.raises(ValueError, match="H=8"):
        lm_head_loss(partitioned, torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


# --- targets ---------------------------------------------------------------------------


def test_select_targets_by_hand():
    # Row 0: sample 0 (task 0) at 0..3, sample 1 (task 2) at 4..6, padding at 7.
    # Row 1: sample 2 (task 1) at 0..2, then a contiguous-packing piece, sample 3 (task 0), at
    # 3..5 whose first token is trained: target of position 2 with the piece's task and sample.
    labels = torch.tensor(
        [[-100, -100, 7, 8, -100, -100, 11, -100], [-100, 21, -100, 23, 24, -100, -100, -100]]
    )
    task_ids = torch.tensor([[0, 0, 0, 0, 2, 2, 2, -1], [1, 1, 1, 0, 0, 0, -1, -1]])
    sample_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1], [2, 2, 2, 3, 3, 3, -1, -1]])
    targets = select_targets({"labels": labels, "task_ids": task_ids, "sample_ids": sample_ids})
    expected_positions = [[0, 1, 1, 0, 0, 1, 0, 0], [1, 0, 1, 1, 0, 0, 0, 0]]
    assert targets.positions.tolist() == [[bool(x) for x in row] for row in expected_positions]
    assert targets.token_ids.tolist() == [7, 8, 11, 21, 23, 24]
    assert targets.task_ids.tolist() == [0, 0, 2, 1, 0, 0]
    assert targets.sample_ids.tolist() == [0, 0, 1, 2, 3, 3]
    assert targets.num_targets == 6


# --- coefficients ----------------------------------------------------------------------

_NEXT_ID = iter(range(10, 10**6))
_WEIGHTS = torch.tensor([1.0, 2.0, 5.0, 0.5])


def _sample(task: int, trained: list[int], *, is_start: bool = True) -> Sample:
    ids = np.array([next(_NEXT_ID) for _ in trained], dtype=np.int32)  # every token id distinct
    return Sample(ids, np.array(trained, dtype=bool), task, 0, is_start=is_start)


def _step() -> list[tuple[list[list[Sample]], bool]]:
    """Three micro-batches (rows of samples, isolated) over tasks 0, 1 and 3; task 2 is absent."""
    return [
        ([[_sample(0, [0, 0, 1, 1, 1]), _sample(1, [1, 1, 1, 1])], [_sample(3, [0, 0, 0, 1, 1, 0])]], True),
        # The task-1 sample here has no trained token: it is not a sample of the step.
        ([[_sample(0, [0, 1, 1]), _sample(1, [0, 0, 0, 0]), _sample(3, [1, 1, 1])]], True),
        # Contiguous packing: a piece continuing a task-0 sample after a task-3 sample.
        (
            [
                [_sample(3, [0, 1]), _sample(0, [1, 1, 1], is_start=False)],
                [_sample(1, [1, 1, 1, 1, 1, 1, 1])],
            ],
            False,
        ),
    ]


def _reference(step, strategy: str, weights: list[float]) -> list[float]:
    """Coefficients from DESIGN.md §3, sample by sample with plain Python."""
    tokens = []  # (micro-batch, sample object id, task) per target, in row-major order
    for m, (rows, _) in enumerate(step):
        for row in rows:
            offset = 0
            for s in row:
                for j, trained in enumerate(s.trained.tolist()):
                    # A sample's first token is no target, nor is a row's first token.
                    if trained and not (j == 0 and (s.is_start or offset == 0)):
                        tokens.append((m, id(s), s.task_id))
                offset += len(s.trained)
    tokens_per_task = Counter(task for _, _, task in tokens)
    size = Counter((m, s) for m, s, _ in tokens)
    samples_per_task = Counter(task for (m, s), task in {(m, s): t for m, s, t in tokens}.items())
    n, s_total = len(tokens), len(size)
    w_total = sum(weights[k] for k in tokens_per_task)
    out = []
    for m, s, k in tokens:
        out.append(
            {
                "token": 1 / n,
                "sample": 1 / (s_total * size[m, s]),
                "task": weights[k] / (tokens_per_task[k] * w_total),
                "coba": weights[k] / (tokens_per_task[k] * w_total),
                "task_sample": weights[k] / (samples_per_task[k] * size[m, s] * w_total),
            }[strategy]
        )
    return out


def _coefficients(batches, strategy: str, weights: torch.Tensor, num_tasks: int = 4) -> torch.Tensor:
    counts = count_step(batches, num_tasks)
    return torch.cat([token_coefficients(select_targets(b), counts, strategy, weights) for b in batches])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_coefficients_match_reference(strategy):
    step = _step()
    batches = [collate_rows(rows, pad_id=0, isolated=isolated) for rows, isolated in step]
    got = _coefficients(batches, strategy, _WEIGHTS)
    assert got.dtype == torch.float32
    expected = torch.tensor(_reference(step, strategy, _WEIGHTS.tolist()))
    torch.testing.assert_close(got, expected.float())
    torch.testing.assert_close(got.double().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_step_counts_by_hand():
    batches = [collate_rows(rows, pad_id=0, isolated=isolated) for rows, isolated in _step()]
    counts = count_step(batches, 4)
    # Targets per sample (rows split by |): mb0 3, 3 | 2; mb1 2, 0, 2; mb2 1, 3 | 6.
    assert counts.tokens_per_task.tolist() == [3 + 2 + 3, 3 + 6, 0, 2 + 2 + 1]
    assert counts.samples_per_task.tolist() == [3, 2, 0, 3]
    assert counts.num_tokens.item() == 22 and counts.num_samples.item() == 8


def test_aliases_and_unknown_strategy():
    batch = collate_rows(_step()[0][0], pad_id=0)
    counts = count_step([batch], 4)
    targets = select_targets(batch)
    for alias, name in [("case1", "token"), ("case2", "sample"), ("case3", "task"), ("case4", "task_sample")]:
        assert torch.equal(
            token_coefficients(targets, counts, alias, _WEIGHTS),
            token_coefficients(targets, counts, name, _WEIGHTS),
        )
    with pytest.raises(ValueError, match="unknown loss strategy"):
        token_coefficients(targets, counts, "case5", _WEIGHTS)
    with pytest.raises(ValueError, match="shape"):
        token_coefficients(targets, counts, "task", torch.ones(3))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_coefficients_do_not_depend_on_micro_batching(strategy):
    rows = [
        [_sample(0, [0, 1, 1, 1]), _sample(2, [0, 1])],
        [_sample(1, [0, 0, 1, 1, 1, 1, 1])],
        [_sample(2, [0, 1, 1]), _sample(0, [0, 1]), _sample(1, [0, 1, 1])],
        [_sample(0, [0, 0, 0, 1, 1])],
    ]
    weights = torch.tensor([0.3, 1.0, 2.5])
    whole = _coefficients([collate_rows(rows, pad_id=0)], strategy, weights, num_tasks=3)
    split = _coefficients([collate_rows([row], pad_id=0) for row in rows], strategy, weights, num_tasks=3)
    assert whole.shape == (16,)
    torch.testing.assert_close(whole, split, rtol=1e-6, atol=0)


@pytest.mark.parametrize("strategy", ["task", "task_sample", "coba"])
def test_scaling_task_weights_changes_nothing(strategy):
    batches = [collate_rows(rows, pad_id=0, isolated=isolated) for rows, isolated in _step()]
    torch.testing.assert_close(
        _coefficients(batches, strategy, _WEIGHTS), _coefficients(batches, strategy, _WEIGHTS * 7.3)
    )


def test_one_task_reduces_to_token_and_sample():
    rows = [[_sample(1, [0, 1, 1]), _sample(1, [0, 1, 1, 1, 1])], [_sample(1, [0, 0, 1])]]
    batches = [collate_rows(rows[:1], pad_id=0), collate_rows(rows[1:], pad_id=0)]
    weights = torch.tensor([3.0, 7.0, 11.0])  # tasks 0 and 2 are absent from the step
    token, sample = (_coefficients(batches, s, weights, num_tasks=3) for s in ("token", "sample"))
    assert not torch.allclose(token, sample)
    torch.testing.assert_close(_coefficients(batches, "task", weights, num_tasks=3), token)
    torch.testing.assert_close(_coefficients(batches, "task_sample", weights, num_tasks=3), sample)


def test_step_without_targets():
    batch = collate_rows([[_sample(0, [1, 0, 0])]], pad_id=0)
    counts = count_step([batch], 2)
    assert counts.num_tokens.item() == 0
    for strategy in STRATEGIES:
        assert token_coefficients(select_targets(batch), counts, strategy, torch.ones(2)).shape == (0,)


def test_reduce_counts_is_one_all_reduce():
    batches = [collate_rows(rows, pad_id=0, isolated=isolated) for rows, isolated in _step()]
    local = count_step(batches, 4)
    calls = []

    def two_identical_ranks(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return t * 2

    total = reduce_counts(local, two_identical_ranks)
    assert len(calls) == 1
    assert torch.equal(total.tokens_per_task, local.tokens_per_task * 2)
    assert torch.equal(total.samples_per_task, local.samples_per_task * 2)
    assert total.num_tokens.item() == 2 * local.num_tokens.item()
    assert total.num_samples.item() == 2 * local.num_samples.item()

    # An in-place reduce that returns None, like torch.distributed.all_reduce.
    def in_place_all_reduce(t: torch.Tensor) -> None:
        t.mul_(3)

    in_place = reduce_counts(local, in_place_all_reduce)
    assert torch.equal(in_place.tokens_per_task, local.tokens_per_task * 3)


def test_per_task_sums():
    batch = collate_rows(_step()[0][0], pad_id=0)
    targets = select_targets(batch)  # tasks [0, 0, 0, 1, 1, 1, 3, 3]
    assert targets.task_ids.tolist() == [0, 0, 0, 1, 1, 1, 3, 3]
    loss = torch.arange(8, dtype=torch.float32, requires_grad=True)
    correct = torch.tensor([1, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    sums = per_task_sums(loss, correct, targets, 4)
    assert sums["loss_sum"].tolist() == [0 + 1 + 2, 3 + 4 + 5, 0, 6 + 7]
    assert sums["num_correct"].tolist() == [2, 3, 0, 0]
    assert sums["num_tokens"].tolist() == [3, 3, 0, 2]
    assert not sums["loss_sum"].requires_grad
