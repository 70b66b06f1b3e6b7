"""mftune's CoBa against MFTCoder's `CoBaStatus.compute_per_task_weight`, side by side on the same probe histories.

`mftcoder_weights` below re-implements MFTCoder's computation from its code (mftcoder_accelerate/src/utils/
loss_utils.py): slopes by solving the normal equations of a weighted least-squares fit, RCS, ACS, the
divergence factor from the per-probe largest loss, the jump to a floor. Each of mftune's documented fixes
(docs/mftcoder-compat.md) is a switch; with all of them on, the weights must equal mftune's to 1e-14, and
with them off the reference shows MFTCoder's defects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mftune.loss.coba import CobaBalancer


@dataclass(frozen=True)
class Fixes:
    """mftune's changes to MFTCoder's computation, each on (True) or off (MFTCoder's behaviour)."""

    centred_fit: bool = True  # MFTCoder solves the normal equations at raw step numbers: digits lost
    first_probe_in_window: bool = True  # MFTCoder's history starts after step 0, its normaliser
    acs_last_history: bool = True  # MFTCoder slices its slope list from an index counted from step 0
    df_from_task_slopes: bool = True  # MFTCoder fits a slope to the per-probe largest loss
    df_clamped: bool = True  # MFTCoder's DF exceeds 1 while the worst slope steepens
    continuous_floor: bool = True  # MFTCoder jumps to (1 - K floor) w + floor once a weight is below floor
    zero_sums_are_zero: bool = True  # MFTCoder divides by a sum of |slopes| that can be 0: NaN


ALL = Fixes()
NONE = Fixes(False, False, False, False, False, False, False)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _slope(x: np.ndarray, y: np.ndarray, centred: bool) -> float:
    """MFTCoder's fit_window_slope: weights 1, design matrix [x, 1], the normal equations solved; or the
    same least squares at step numbers centred on their mean (mftune's), which keeps its digits."""
    if len(y) < 2:
        return 0.0
    if centred:
        x = x - x.mean()
    design = np.stack([x, np.ones_like(x)], axis=1)
    return float(np.linalg.solve(design.T @ design, design.T @ y)[0])


def _ratio(values: np.ndarray, total: float, fix: bool) -> np.ndarray:
    if fix and total == 0:
        return np.zeros_like(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        return values / total


def mftcoder_weights(
    ratios: np.ndarray, warmup: int, history: int, tau: float, fixes: Fixes
) -> list[np.ndarray]:
    """The weights after each probe from `warmup` on.

    Args:
        ratios: (T, K) probe losses over the first probe's, one probe per optimizer step (0, 1, ..., T-1),
            every task present.
    """
    num_probes, num_tasks = ratios.shape
    slope_list: list[np.ndarray] = []
    total_slopes: list[float] = []
    out = []
    for step in range(warmup, num_probes):
        rows = ratios[: step + 1] if fixes.first_probe_in_window else ratios[1 : step + 1]
        start = max(0, len(rows) - history)
        x = np.arange(start, len(rows), dtype=np.float64)
        window = rows[start:]
        slopes = np.array([_slope(x, window[:, k], fixes.centred_fit) for k in range(num_tasks)])
        slope_list.append(slopes)
        if fixes.df_from_task_slopes:
            total_slopes.append(float(slopes.max()))
        else:
            total_slopes.append(_slope(x, window.max(axis=1), fixes.centred_fit))
        rcs = _softmax(num_tasks * _ratio(slopes, np.abs(slopes).sum(), fixes.zero_sums_are_zero))
        listed = np.array(slope_list)  # (n, K)
        # MFTCoder slices its slope list (started at warm-up) from an index counted from step 0.
        recent = listed[-history:] if fixes.acs_last_history else listed[max(0, step - history) :]
        acs_scores = [
            -len(recent) * _ratio(recent[-1, k], np.abs(recent[:, k]).sum(), fixes.zero_sums_are_zero)
            for k in range(num_tasks)
        ]
        acs = _softmax(np.array(acs_scores))
        totals = np.array(total_slopes)
        logits = -len(totals) * _ratio(totals, np.abs(totals).sum(), fixes.zero_sums_are_zero) * tau
        df = _softmax(logits)[-1] * len(totals)
        if fixes.df_clamped:
            df = min(max(df, 0.0), 1.0)
        weights = _softmax(num_tasks * (df * rcs + (1 - df) * acs))
        floor = 1 / (10 * num_tasks)
        if fixes.continuous_floor:
            weights = _continuous_floor(weights, floor)
        elif (weights < floor).any():
            weights = weights * (1 - floor * num_tasks) + floor
        out.append(weights)
    return out


def _continuous_floor(weights: np.ndarray, floor: float) -> np.ndarray:
    # max(floor, c w) with c such that the weights sum to 1, found by raising the smallest first.
    floored = np.zeros(len(weights), dtype=bool)
    while True:
        scale = (1 - floor * floored.sum()) / weights[~floored].sum()
        newly = ~floored & (weights * scale < floor)
        if not newly.any():
            return np.where(floored, floor, weights * scale)
        floored |= newly


def _histories(seed: int, steps: int = 40, num_tasks: int = 3) -> np.ndarray:
    """Raw probe losses (T, K): decaying at different rates, one task turning upwards, with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float64)[:, None]
    rates = rng.uniform(0.02, 0.15, num_tasks)
    curves = 2.0 + 3.0 * np.exp(-rates * t)
    curves[:, -1] += 0.002 * np.maximum(t[:, 0] - 25, 0) ** 2  # over-fits late
    return curves * (1 + 0.01 * rng.standard_normal(curves.shape))


def _mftune_weights(losses: np.ndarray, warmup: int, history: int, tau: float) -> list[np.ndarray]:
    balancer = CobaBalancer(losses.shape[1], warmup=warmup, history=history, tau=tau, update_interval=1)
    out = []
    for step, row in enumerate(losses):
        balancer.observe(step, row.tolist())
        if step >= warmup:
            out.append(balancer.state_dict()["weights"])  # float64, as the balancer keeps them
    return [np.asarray(w) for w in out]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("warmup", "history"), [(3, 5), (10, 8), (2, 50)])
def test_mftune_equals_mftcoder_with_the_fixes_on(seed: int, warmup: int, history: int) -> None:
    losses = _histories(seed)
    ratios = losses / losses[0]
    ours = _mftune_weights(losses, warmup, history, tau=5.0)
    theirs = mftcoder_weights(ratios, warmup, history, 5.0, ALL)
    assert len(ours) == len(theirs) == len(losses) - warmup
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True)) < 1e-14


def _accelerating(steps: int = 40) -> np.ndarray:
    """Losses falling faster and faster: the worst slope steepens, which drives MFTCoder's DF above 1."""
    t = np.arange(steps, dtype=np.float64)[:, None]
    return 5.0 - np.array([0.001, 0.0015, 0.002]) * t**2


# The histories on which each fix shows: the floor needs many tasks (weights below 1/(10K)), the clamp a
# steepening worst slope, the centred fit step numbers far from 0.
_SHOWN_ON = {"continuous_floor": _histories(1, num_tasks=6), "df_clamped": _accelerating()}


@pytest.mark.parametrize(
    "fix", [f for f in Fixes.__dataclass_fields__ if f not in ("zero_sums_are_zero", "centred_fit")]
)
def test_each_fix_changes_mftcoders_weights(fix: str) -> None:
    """Every switch matters: turning one off moves the weights (the zero sums and the fit: below)."""
    losses = _SHOWN_ON.get(fix, _histories(0))
    ratios = losses / losses[0]
    reference = mftcoder_weights(ratios, 3, 5, 5.0, ALL)
    changed = mftcoder_weights(ratios, 3, 5, 5.0, Fixes(**{**ALL.__dict__, fix: False}))
    assert max(float(np.abs(a - b).max()) for a, b in zip(reference, changed, strict=True)) > 1e-6


def test_constant_losses_give_mftcoder_nan_weights_and_mftune_uniform_ones() -> None:
    losses = np.full((12, 3), 2.5)
    theirs = mftcoder_weights(losses / losses[0], 3, 5, 5.0, NONE)
    assert np.isnan(theirs[-1]).all()  # MFTCoder divides 0 by a zero sum of |slopes|
    ours = _mftune_weights(losses, 3, 5, 5.0)
    np.testing.assert_allclose(ours[-1], np.full(3, 1 / 3), rtol=0, atol=1e-15)


def test_mftune_floor_keeps_the_ratios_of_the_other_weights_exactly() -> None:
    import torch

    from mftune.loss.coba import _apply_floor

    floored = _apply_floor(torch.tensor([0.049, 0.951], dtype=torch.float64), 0.05)
    assert floored.tolist() == pytest.approx([0.05, 0.95], abs=1e-15)  # not 0.949999988 (a float32 1 - 0.05)


def test_the_normal_equations_lose_digits_at_large_step_numbers() -> None:
    x = np.arange(20_000, 20_200, dtype=np.float64)
    y = 1.0 - 1e-5 * x + 1e-3 * np.sin(x)
    exact = float(np.polyfit(x - x.mean(), y, 1)[0])
    assert abs(_slope(x, y, centred=True) / exact - 1) < 1e-12
    assert abs(_slope(x, y, centred=False) / exact - 1) > 1e-11  # MFTCoder's: a hundred times further off
