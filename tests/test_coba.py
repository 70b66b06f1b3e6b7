"""Convergence balancing (CoBa): hand-made probe-loss histories whose right answer is known."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch

from mftune.loss.coba import CobaBalancer

Curve = Callable[[int], float]  # normalised probe loss r_k at a step


def _balancer(num_tasks: int = 3, **overrides) -> CobaBalancer:
    kwargs = {"warmup": 4, "history": 4, "tau": 5.0, "update_interval": 1, **overrides}
    return CobaBalancer(num_tasks, **kwargs)


def _feed(balancer: CobaBalancer, curves: list[Curve], steps: Iterable[int]) -> list[torch.Tensor]:
    """Observe raw losses `initial_k * curve_k(step)`; the initial losses differ so that the
    normalisation by the first probe is exercised."""
    initial = [2.0, 3.0, 0.5, 1.7, 4.2, 0.9, 2.5, 1.1, 3.3, 0.7]
    return [balancer.observe(step, [initial[k] * c(step) for k, c in enumerate(curves)]) for step in steps]


def _assert_valid(weights: torch.Tensor, floor: float) -> None:
    assert weights.dtype == torch.float32
    assert torch.isfinite(weights).all()
    assert math.isclose(float(weights.sum()), 1.0, abs_tol=1e-6)
    # float32 rounding is monotone, so a weight at or above the floor stays at or above float32(floor)
    assert (weights >= torch.tensor(floor, dtype=torch.float32)).all(), weights


# --- the two regimes of the divergence factor -------------------------------------------------


def test_divergence_onset_drops_df_and_acs_ranks_falling_plateaued_diverging() -> None:
    # A falls steadily; B falls, then plateaus from step 5; C falls, then rises from step 10
    # (over-fitting). With a 4-probe window, at step 19 the slopes are exactly A = -0.02,
    # B = 0, C = +0.01.
    # DF: the worst slope α_max was negative or 0 until C turned and is +0.01 now, so the current
    # logit -τT·α_max/Σ|α_max| is the only negative one among positive ones: DF ≈ 0 and
    # w ≈ softmax(3 · ACS).
    # ACS: each task's current slope against its own last 4 slopes: A has been -0.02 throughout,
    # -4·(-0.02)/0.08 = +1; B is 0 now, 0; C has been +0.01 for the whole window, -1. So
    # A > B > C: the task still converging gets the most, the diverging one the least.
    # (RCS alone would rank them the other way round: C > B > A.)
    curves = [
        lambda t: 1 - 0.02 * t,
        lambda t: max(1 - 0.02 * t, 0.9),
        lambda t: 1 - 0.01 * t if t <= 10 else 0.9 + 0.01 * (t - 10),
    ]
    balancer = _balancer(warmup=4, history=4)
    weights = _feed(balancer, curves, range(20))[-1]
    diag = balancer.diagnostics()
    assert diag["slopes"] == pytest.approx([-0.02, 0.0, 0.01], abs=1e-12)
    assert diag["acs"][0] > diag["acs"][1] > diag["acs"][2]
    assert diag["rcs"][2] > diag["rcs"][1] > diag["rcs"][0]
    assert 0 <= diag["df"][0] < 1e-3
    assert weights[0] > weights[1] > weights[2]
    acs = _softmax([1.0, 0.0, -1.0])
    assert diag["acs"] == pytest.approx(acs, abs=1e-12)
    assert weights.tolist() == pytest.approx(_softmax([3 * a for a in acs]), abs=1e-4)  # DF ≈ 0


def test_steady_convergence_keeps_df_at_one_and_rcs_favours_the_plateauing_task() -> None:
    # All three fall at constant rates: A fast (-0.03/step), B nearly plateaued (-0.001), C in
    # between (-0.01). α_max = -0.001 at every probe, so all DF logits are equal and
    # DF = T · (1/T) = 1: RCS rules. RCS_k = softmax(3·α_k/0.041) ranks B > C > A (the slowest
    # converger gets the most), and w = softmax(3 · RCS), computed here by hand.
    curves = [lambda t: 1 - 0.03 * t, lambda t: 1 - 0.001 * t, lambda t: 1 - 0.01 * t]
    balancer = _balancer(warmup=3, history=5)
    weights = _feed(balancer, curves, range(20))[-1]
    assert balancer.diagnostics()["df"] == [pytest.approx(1.0, abs=1e-12)]
    slopes = [-0.03, -0.001, -0.01]
    rcs = _softmax([3 * s / sum(abs(x) for x in slopes) for s in slopes])
    assert weights.tolist() == pytest.approx(_softmax([3 * r for r in rcs]), abs=1e-6)
    assert weights[1] > weights[2] > weights[0]


def test_decelerating_convergence_hands_control_to_acs() -> None:
    # Ordinary fine-tuning curves: every task falls exponentially towards a floor, at different
    # rates, and none diverges. The worst slope rises towards 0 as the losses flatten, which the
    # divergence factor (the same expression as MFTCoder's) reads as the worst task turning up:
    # DF drops to ~0, so ACS, not RCS, sets the weights from then on (docs/multitask-quality.md).
    # Computed independently: DF = T · softmax(-τ·T·α_max / Σ|α_max|)[T] from the α_max history.
    curves = [lambda t, rate=rate: 0.3 + 0.7 * math.exp(-t / rate) for rate in (15.0, 40.0, 80.0)]
    balancer = _balancer(warmup=10, history=10)
    _feed(balancer, curves, range(120))
    max_slopes = np.array(balancer.state_dict()["max_slope_history"])
    logits = -5.0 * max_slopes.size * max_slopes / np.abs(max_slopes).sum()
    expected = max_slopes.size * np.exp(logits[-1] - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.all(np.diff(max_slopes) > 0)  # the worst slope only ever flattens
    df = balancer.diagnostics()["df"][0]
    assert df == pytest.approx(min(expected, 1.0), rel=1e-9, abs=1e-15)
    assert df < 0.01
    diag = balancer.diagnostics()
    mixed = [df * r + (1 - df) * a for r, a in zip(diag["rcs"], diag["acs"], strict=True)]
    assert balancer.weights.tolist() == pytest.approx(_softmax([3 * m for m in mixed]), abs=1e-6)


def _softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(x) for x in logits]
    return [e / sum(exps) for e in exps]


# --- bounds ----------------------------------------------------------------------------------

_ADVERSARIAL: dict[str, list[Curve]] = {
    "huge slopes": [lambda t: 1e40 ** min(t, 1) * (1 + t), lambda t: 1 - 1e-3 * t, lambda t: 1.0],
    "all falling, faster and faster": [
        lambda t: 1 - 1e-4 * t * t,
        lambda t: 1 - 2e-4 * t * t,
        lambda t: 1 - 0.01 * t,
    ],
    "all rising, faster and faster": [
        lambda t: 1 + 1e-3 * t * t,
        lambda t: 1 + 0.01 * t,
        lambda t: 1 + 1e-4 * t**3,
    ],
    "all rising steadily": [lambda t: 1 + 0.01 * t, lambda t: 1 + 0.02 * t, lambda t: 1 + 0.5 * t],
    "constant": [lambda t: 1.0, lambda t: 1.0, lambda t: 1.0],
    "zig-zag": [lambda t: 1 + 0.3 * (-1) ** t, lambda t: 1 - 0.3 * (-1) ** t, lambda t: 1 + 1e-9 * t],
}


@pytest.mark.parametrize("name", list(_ADVERSARIAL))
def test_df_stays_in_unit_interval_and_weights_stay_valid(name: str) -> None:
    balancer = _balancer(warmup=2, history=6)
    for step in range(30):
        weights = _feed(balancer, _ADVERSARIAL[name], [step])[0]
        _assert_valid(weights, balancer.floor)
        if "df" in balancer.diagnostics():
            assert 0.0 <= balancer.diagnostics()["df"][0] <= 1.0


def test_df_is_clamped_where_the_formula_exceeds_one() -> None:
    # While the worst slope keeps steepening, the current α_max is the most negative of its history
    # and T · softmax(...)[T] > 1 (MFTCoder uses that value unclamped, so 1 - DF < 0).
    balancer = _balancer(warmup=2, history=6)
    _feed(balancer, _ADVERSARIAL["all falling, faster and faster"], range(30))
    max_slopes = torch.tensor(balancer.state_dict()["max_slope_history"], dtype=torch.float64)
    count = max_slopes.numel()
    unclamped = count * torch.softmax(-5.0 * count * max_slopes / max_slopes.abs().sum(), 0)[-1]
    assert unclamped > 1.5
    assert balancer.diagnostics()["df"] == [1.0]


def test_floor_raises_low_weights_and_keeps_the_ratios_of_the_others() -> None:
    # Nine tasks converging steadily and one turning upwards: DF ≈ 0, and the rising task's weight
    # (about 0.04 without a floor) is below a floor of 0.08.
    curves: list[Curve] = [lambda t, r=r: 1 - r * t for r in np.linspace(0.005, 0.03, 9)]
    curves.append(lambda t: 1 - 0.01 * t if t <= 8 else 0.92 + 0.02 * (t - 8))
    free, floored = _balancer(10, floor=0.0), _balancer(10, floor=0.08)
    free_weights = _feed(free, curves, range(20))[-1].double()
    weights = _feed(floored, curves, range(20))[-1]
    _assert_valid(weights, 0.08)
    assert free_weights[9] < 0.08
    assert weights[9] == torch.tensor(0.08, dtype=torch.float32)
    ratios = weights[:9].double() / free_weights[:9]
    assert ratios.tolist() == pytest.approx([float(ratios[0])] * 9, rel=1e-6)


@pytest.mark.parametrize("floor", [None, 0.0, 0.2, 0.25])
def test_weights_respect_the_floor_and_sum_to_one(floor: float | None) -> None:
    curves: list[Curve] = [
        lambda t: 1 - 0.05 * t,
        lambda t: 1.0,
        lambda t: 1 + 0.5 * t * t,
        lambda t: 1 / (1 + t),
    ]
    balancer = _balancer(4, floor=floor, warmup=1)
    assert balancer.floor == (1 / 40 if floor is None else floor)
    for weights in _feed(balancer, curves, range(15)):
        _assert_valid(weights, balancer.floor)
    if floor == 0.25:  # K · floor = 1 leaves nothing to balance
        assert torch.equal(weights, torch.full((4,), 0.25))


def test_constant_losses_give_uniform_weights_without_nan() -> None:
    balancer = _balancer(warmup=0)
    for weights in _feed(balancer, [lambda t: 1.0] * 3, range(10)):
        assert weights.tolist() == pytest.approx([1 / 3] * 3, abs=1e-7)
    diag = balancer.diagnostics()
    assert diag["slopes"] == [0.0, 0.0, 0.0]
    assert all(math.isfinite(v) for values in diag.values() for v in values)


def test_a_single_task_always_gets_weight_one() -> None:
    balancer = _balancer(1, warmup=0)
    for weights in _feed(balancer, [lambda t: 1 / (1 + t)], range(6)):
        assert weights.tolist() == [1.0]


# --- slopes -----------------------------------------------------------------------------------


def test_missing_points_are_fitted_at_their_true_steps() -> None:
    # A convex curve at uneven steps: pairing the present values with the wrong steps (as MFTCoder
    # does after dropping absent ones) would change the slope. Task 1 is absent at step 10 (None)
    # and at step 40 (NaN in a tensor).
    steps = [0, 5, 10, 20, 25, 40, 45, 60]
    curve = [1 / (1 + 0.05 * s) for s in steps]
    balancer = _balancer(2, warmup=0, history=len(steps))
    for step, ratio in zip(steps, curve, strict=True):
        if step == 10:
            balancer.observe(step, [2.0 * ratio, None])
        elif step == 40:
            balancer.observe(step, torch.tensor([2.0 * ratio, math.nan], dtype=torch.float64))
        else:
            balancer.observe(step, [2.0 * ratio, 3.0 * ratio])
    present = [i for i, s in enumerate(steps) if s not in (10, 40)]
    expected = [
        np.polyfit(steps, curve, 1)[0],
        np.polyfit([steps[i] for i in present], [curve[i] for i in present], 1)[0],
    ]
    assert balancer.diagnostics()["slopes"] == pytest.approx(expected, rel=1e-9)
    misaligned = np.polyfit(steps[: len(present)], [curve[i] for i in present], 1)[0]
    assert not math.isclose(misaligned, expected[1], rel_tol=1e-3)


def test_a_task_without_a_slope_keeps_its_uniform_share() -> None:
    # Task 2 is absent from every probe but one: it has no slope, so it keeps 1/K and the other two
    # are balanced within the remaining 2/3.
    balancer = _balancer(warmup=2)
    for step in range(10):
        third = 1.0 if step == 3 else None
        weights = balancer.observe(step, [2.0 * (1 - 0.05 * step), 3.0 * (1 - 0.01 * step), third])
    _assert_valid(weights, balancer.floor)
    assert weights[2] == torch.tensor(1 / 3, dtype=torch.float32)
    assert weights[1] > weights[0]  # DF = 1 (steady convergence): RCS favours the slower task
    assert math.isnan(balancer.diagnostics()["slopes"][2])
    assert math.isnan(balancer.diagnostics()["rcs"][2])


def test_only_the_last_history_probes_affect_the_slopes() -> None:
    def run(history: int, early: float) -> list[float]:
        balancer = _balancer(2, warmup=0, history=history)
        for step in range(16):
            ratio = 1 - 0.01 * step if step > 10 else early * (1 + 0.1 * step)  # steps 1-10 differ
            balancer.observe(step, [1.0, 1.0] if step == 0 else [ratio, ratio**2])
        return balancer.diagnostics()["slopes"]

    window = list(range(11, 16))  # the last 5 probes
    expected = [np.polyfit(window, [(1 - 0.01 * s) ** p for s in window], 1)[0] for p in (1, 2)]
    assert run(5, early=1.0) == pytest.approx(expected, rel=1e-9)
    assert run(5, early=3.0) == run(5, early=1.0)
    assert run(6, early=3.0) != pytest.approx(run(6, early=1.0), rel=1e-3)  # step 10 is in the window


# --- schedule and state -----------------------------------------------------------------------


def test_weights_are_uniform_during_warmup_and_the_history_is_still_collected() -> None:
    curves = [lambda t: 1 - 0.03 * t, lambda t: 1 - 0.001 * t, lambda t: 1 + 0.02 * t * t]
    balancer = _balancer(warmup=5, history=10)
    assert torch.equal(balancer.weights, torch.full((3,), 1 / 3))
    history = _feed(balancer, curves, range(0, 7))
    for weights in history[:5]:
        assert torch.equal(weights, torch.full((3,), 1 / 3))
    assert not torch.equal(history[5], torch.full((3,), 1 / 3))
    steps = list(range(7))
    expected = np.polyfit(steps, [1 + 0.02 * t * t for t in steps], 1)[0]
    assert balancer.diagnostics()["slopes"][2] == pytest.approx(expected, rel=1e-9)


def test_due_every_update_interval() -> None:
    balancer = _balancer(update_interval=10)
    assert [step for step in range(35) if balancer.due(step)] == [0, 10, 20, 30]


def _noisy_losses(step: int) -> list[float | None]:
    """Falling, noisy losses for probes every 10 steps; one task absent at every 4th probe."""
    gen = torch.Generator().manual_seed(step)
    noise = torch.rand(3, generator=gen, dtype=torch.float64)
    losses: list[float | None] = ((noise + 2) * math.exp(-0.01 * step)).tolist()
    if step // 10 % 4 == 3:
        losses[step // 10 % 3] = None
    return losses


def test_state_dict_round_trip_through_json_gives_bitwise_identical_weights() -> None:
    steps = range(0, 160, 10)
    uninterrupted = _balancer(warmup=30, history=5)
    reference = [uninterrupted.observe(step, _noisy_losses(step)) for step in steps]

    first = _balancer(warmup=30, history=5)
    for step in steps[:8]:
        first.observe(step, _noisy_losses(step))
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = _balancer(warmup=30, history=5)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.weights, reference[7])
    assert json.dumps(resumed.diagnostics()) == json.dumps(first.diagnostics())
    for step, expected in zip(steps[8:], reference[8:], strict=True):
        assert torch.equal(resumed.observe(step, _noisy_losses(step)), expected)
    assert json.dumps(resumed.diagnostics()) == json.dumps(uninterrupted.diagnostics())
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_invalid_arguments_and_probes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"coba\.floor"):
        _balancer(4, floor=0.3)
    with pytest.raises(ValueError, match=r"coba\.history"):
        _balancer(history=1)
    balancer = _balancer()
    with pytest.raises(ValueError, match="one per task"):
        balancer.observe(0, [1.0, 2.0])
    with pytest.raises(ValueError, match="negative"):
        balancer.observe(0, [1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="is 0"):
        balancer.observe(0, [1.0, 0.0, 1.0])
    balancer.observe(10, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="does not follow"):
        balancer.observe(10, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="for 3 tasks"):
        _balancer(2).load_state_dict(balancer.state_dict())
