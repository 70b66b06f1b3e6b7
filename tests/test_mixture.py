"""Mixture: splits, sampling probabilities, exact epochs, rank sharding."""

from __future__ import annotations

import numpy as np
import pytest

from mftune.data.mixture import (
    epoch_order,
    samples_per_epoch,
    sampling_probabilities,
    shard_for_rank,
    split_train_valid,
    stable_seed,
)


def _draws(order: np.ndarray, task_index: int) -> np.ndarray:
    return order[order[:, 0] == task_index, 1]


def _multiplicities(draws: np.ndarray, num: int) -> np.ndarray:
    return np.bincount(draws, minlength=num)


# --- seeds and splits ---------------------------------------------------------------


def test_stable_seed_is_deterministic_63_bit_and_type_aware():
    assert stable_seed(1, "a") == stable_seed(1, "a")
    assert 0 <= stable_seed(1, "a") < 2**63
    assert stable_seed(1) != stable_seed("1")
    assert stable_seed("a", 1) != stable_seed("a1")
    assert stable_seed(1, "a") != stable_seed(1, "b")


def test_split_is_deterministic_disjoint_and_complete():
    train, valid = split_train_valid(100, 0.1, seed=7, task="code")
    again_train, again_valid = split_train_valid(100, 0.1, seed=7, task="code")
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(valid, again_valid)
    assert len(valid) == 10 and len(train) == 90
    assert not set(train) & set(valid)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, valid])), np.arange(100))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(valid) > 0)
    assert train.dtype == valid.dtype == np.int64


def test_split_depends_on_task_name_and_seed_only():
    _, valid = split_train_valid(1000, 0.05, seed=0, task="code")
    _, other_task = split_train_valid(1000, 0.05, seed=0, task="explain")
    _, other_seed = split_train_valid(1000, 0.05, seed=1, task="code")
    assert not np.array_equal(valid, other_task)
    assert not np.array_equal(valid, other_seed)
    # Splitting another task in between (i.e. adding a task) changes nothing for this one.
    split_train_valid(500, 0.2, seed=0, task="new_task")
    np.testing.assert_array_equal(split_train_valid(1000, 0.05, seed=0, task="code")[1], valid)


def test_split_sizes_cap_and_floor():
    assert len(split_train_valid(1000, 0.1, 0, "t", max_valid=25)[1]) == 25
    assert len(split_train_valid(10, 0.01, 0, "t")[1]) == 1  # round(0.1) = 0, raised to 1
    assert len(split_train_valid(3, 0.9, 0, "t")[1]) == 2  # training keeps at least one sample
    train, valid = split_train_valid(1, 0.5, 0, "t")
    assert list(train) == [0] and len(valid) == 0
    assert len(split_train_valid(10, 0.0, 0, "t")[1]) == 0
    with pytest.raises(ValueError):
        split_train_valid(10, 1.0, 0, "t")


# --- probabilities ------------------------------------------------------------------


def test_probabilities_by_strategy():
    sizes = {"a": 100, "b": 400}
    assert sampling_probabilities(sizes, "proportional") == pytest.approx({"a": 0.2, "b": 0.8})
    assert sampling_probabilities(sizes, "uniform") == pytest.approx({"a": 0.5, "b": 0.5})
    # sqrt(100) : sqrt(400) = 10 : 20
    assert sampling_probabilities(sizes, "temperature", temperature=2.0) == pytest.approx(
        {"a": 1 / 3, "b": 2 / 3}
    )
    assert sampling_probabilities(sizes, "temperature", temperature=1.0) == pytest.approx(
        sampling_probabilities(sizes, "proportional")
    )


def test_explicit_weights_override_strategy():
    probs = sampling_probabilities({"a": 100, "b": 400}, "proportional", explicit={"a": 3.0, "b": 1.0})
    assert probs == pytest.approx({"a": 0.75, "b": 0.25})


def test_partial_explicit_weights_name_the_missing_tasks():
    with pytest.raises(ValueError, match=r"\['b', 'c'\]"):
        sampling_probabilities({"a": 1, "b": 2, "c": 3}, "uniform", explicit={"a": 1.0, "b": None})


def test_empty_tasks_get_zero_and_all_empty_is_an_error():
    probs = sampling_probabilities({"a": 10, "b": 0, "c": 5}, "uniform")
    assert probs == pytest.approx({"a": 0.5, "b": 0.0, "c": 0.5})
    assert sum(probs.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        sampling_probabilities({"a": 0, "b": 0}, "proportional")


# --- samples per epoch --------------------------------------------------------------


def test_samples_per_epoch_largest_remainder_by_hand():
    # E = 10: exact 2.5 and 7.5 -> floors 2 and 7, the spare draw goes to the earlier tie.
    assert samples_per_epoch({"a": 5, "b": 5}, {"a": 0.25, "b": 0.75}) == {"a": 3, "b": 7}
    # Exact 3.3 and 6.7: the spare draw goes to the larger remainder.
    assert samples_per_epoch({"a": 5, "b": 5}, {"a": 0.33, "b": 0.67}) == {"a": 3, "b": 7}
    assert samples_per_epoch({"a": 5, "b": 5}, {"a": 0.67, "b": 0.33}) == {"a": 7, "b": 3}


def test_samples_per_epoch_sums_to_epoch_size():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sizes = {f"t{i}": int(n) for i, n in enumerate(rng.integers(0, 1000, size=6))}
        sizes["t0"] += 1
        probs = sampling_probabilities(sizes, "temperature", temperature=3.0)
        counts = samples_per_epoch(sizes, probs)
        total = sum(sizes.values())
        assert sum(counts.values()) == total
        for name in sizes:
            assert abs(counts[name] - probs[name] * total) < 1
            assert sizes[name] > 0 or counts[name] == 0


# --- epoch order --------------------------------------------------------------------


def test_epoch_order_shape_and_counts_per_task():
    sizes, counts = {"a": 10, "b": 3, "c": 7}, {"a": 4, "b": 7, "c": 9}
    order = epoch_order(sizes, counts, epoch=0, seed=0)
    assert order.shape == (20, 2) and order.dtype == np.int64
    assert np.bincount(order[:, 0]).tolist() == [4, 7, 9]
    for task_index, num in enumerate(sizes.values()):
        draws = _draws(order, task_index)
        assert draws.min() >= 0 and draws.max() < num
    np.testing.assert_array_equal(order, epoch_order(sizes, counts, epoch=0, seed=0))


def test_down_sampling_sees_every_sample_once_before_repeats():
    sizes = {"a": 10}
    per_epoch = [_draws(epoch_order(sizes, {"a": 5}, e, seed=1), 0) for e in range(4)]
    np.testing.assert_array_equal(np.sort(np.concatenate(per_epoch[:2])), np.arange(10))
    np.testing.assert_array_equal(np.sort(np.concatenate(per_epoch[2:])), np.arange(10))
    # 4 draws per epoch do not divide 10: still no repeat among the first 10 draws
    # (epochs 0, 1 and two of epoch 2's), and each sample exactly twice after 20 draws.
    per_epoch = [_draws(epoch_order(sizes, {"a": 4}, e, seed=1), 0) for e in range(5)]
    assert len(set(np.concatenate(per_epoch[:2]).tolist())) == 8
    assert _multiplicities(np.concatenate(per_epoch[:3]), 10).max() <= 2
    assert set(_multiplicities(np.concatenate(per_epoch), 10).tolist()) == {2}


def test_up_sampling_multiplicities():
    sizes = {"a": 3}
    for e in range(3):
        mult = _multiplicities(_draws(epoch_order(sizes, {"a": 7}, e, seed=2), 0), 3)
        assert sorted(mult.tolist()) == [2, 2, 3]  # floor and ceil of 7/3
    total = np.concatenate([_draws(epoch_order(sizes, {"a": 7}, e, seed=2), 0) for e in range(3)])
    assert _multiplicities(total, 3).tolist() == [7, 7, 7]  # the extra draws rotate
    assert _multiplicities(_draws(epoch_order(sizes, {"a": 9}, 0, seed=2), 0), 3).tolist() == [3, 3, 3]


def test_adding_a_task_leaves_the_others_draws_unchanged():
    before = {"a": 10, "b": 4}
    after = {"a": 10, "new": 50, "b": 4}
    counts = {"a": 4, "b": 9, "new": 20}
    for e in range(3):
        old = epoch_order(before, {"a": 4, "b": 9}, e, seed=3)
        new = epoch_order(after, counts, e, seed=3)
        np.testing.assert_array_equal(np.sort(_draws(old, 0)), np.sort(_draws(new, 0)))
        np.testing.assert_array_equal(np.sort(_draws(old, 1)), np.sort(_draws(new, 2)))


def test_epochs_and_seeds_differ():
    sizes, counts = {"a": 50, "b": 30}, {"a": 50, "b": 30}
    first = epoch_order(sizes, counts, 0, seed=0)
    assert not np.array_equal(first, epoch_order(sizes, counts, 1, seed=0))
    assert not np.array_equal(first, epoch_order(sizes, counts, 0, seed=1))


def test_epoch_order_rejects_draws_from_empty_or_unknown_tasks():
    with pytest.raises(ValueError):
        epoch_order({"a": 0}, {"a": 1}, 0, 0)
    with pytest.raises(ValueError):
        epoch_order({"a": 5}, {"zzz": 1}, 0, 0)
    assert epoch_order({"a": 0}, {"a": 0}, 0, 0).shape == (0, 2)


# --- sharding -----------------------------------------------------------------------


@pytest.mark.parametrize("num_items", [0, 1, 7, 12])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_shards_cover_every_item_exactly_once(num_items, world_size):
    items = np.arange(num_items)
    shards = [items[shard_for_rank(num_items, r, world_size)] for r in range(world_size)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), items)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError):
        shard_for_rank(10, 2, 2)
