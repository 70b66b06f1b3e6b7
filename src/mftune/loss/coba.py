"""Convergence balancing (CoBa): task weights from the slopes of validation losses (DESIGN.md §4).

From "CoBa: Convergence Balancer for Multitask Finetuning of Large Language Models" (Gong et al.,
EMNLP 2024, §3) and MFTCoder's `CoBaStatus`, with its defects fixed. Hand-written because no
library provides convergence balancing.

Let r_k(s) = ℓ_k(s) / ℓ_k(s_0) be task k's mean probe loss at optimizer step s divided by its first
probe loss (normally taken before training). At every probe t (one call of `observe`):

1. Slope α_k(t): least-squares slope of r_k against the *step numbers* of the task's points among
   the last `history` probes. A task absent from some probes is fitted on the points it has; it
   has a slope only with at least 2 points. Let A be the m tasks that have one.
2. Relative convergence score, over A: RCS_k = softmax_k(m · α_k(t) / Σ_{j∈A} |α_j(t)|).
   Tasks converging more slowly than the others get more.
3. Absolute convergence score, over A: ACS_k = softmax_k(−n_k · α_k(t) / Σ_i |α_k(i)|), i over
   the task's last `history` slopes (t included, n_k of them). Tasks converging faster than they
   used to get more; a task turning upwards gets less.
4. Divergence factor, from α_max(i) = max_{k∈A} α_k(i) over all T probes since warm-up:
   DF = clamp(T · softmax_i(−τ · T · α_max(i) / Σ_j |α_max(j)|)[T], 0, 1). DF ≈ 1 while the
   worst slope keeps falling (RCS rules); it drops to 0 when the worst slope rises above its
   history, e.g. when a task starts to diverge (ACS rules).
5. p = softmax_{k∈A}(m · (DF · RCS + (1 − DF) · ACS)).
6. Tasks without a slope keep 1/K; those in A share the rest, w_k = p_k · m/K. Then every weight
   below `floor` is raised to it and the others are scaled down: w_k = max(floor, c · w_k), Σ w = 1.

A ratio whose denominator is 0 (all slopes 0, e.g. constant losses) is taken as 0, so the scores
fall back to uniform. Weights are uniform while `step < warmup`; the probe losses are recorded
all along, the slope histories of steps 3-4 only from warm-up on.

Differences from MFTCoder: it pairs the losses left after dropping absent ones (coded as 0.0) with
the first step indices, so a missing point shifts the others in time (here: true step numbers);
its ACS window is indexed from the start of training while its slope history starts at warm-up
(here: the task's last `history` slopes); its DF, fitted on the per-probe maximum loss, is not
clamped and exceeds 1 while the worst slope steepens, which turns 1 − DF negative (here: the
maximum of the task slopes, clamped to [0, 1]); its floor is a jump, mixing with the uniform
weights only when a weight falls below it (here: continuous, and the ratios of unfloored weights
are kept).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

_F64 = torch.float64


class CobaBalancer:
    """Task weights for the `coba` loss strategy, updated from per-task probe losses.

    Args:
        num_tasks: K.
        warmup: Optimizer steps with uniform weights.
        history: Probes in the sliding window of the slope fits (and of each task's slope history).
        tau: Temperature of the divergence factor.
        update_interval: Optimizer steps between probes.
        floor: Smallest task weight; None for 1/(10K).

    Raises:
        ValueError: For an argument out of range, or a floor above 1/K.
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        warmup: int,
        history: int,
        tau: float,
        update_interval: int,
        floor: float | None = None,
    ) -> None:
        if floor is None:
            floor = 1 / (10 * num_tasks) if num_tasks > 0 else 0.0
        for name, value, ok, rule in (
            ("num_tasks", num_tasks, num_tasks >= 1, ">= 1"),
            ("warmup", warmup, warmup >= 0, ">= 0"),
            ("history", history, history >= 2, ">= 2"),
            ("tau", tau, tau > 0, "> 0"),
            ("update_interval", update_interval, update_interval >= 1, ">= 1"),
            ("floor", floor, 0 <= floor * num_tasks <= 1, f"in [0, 1/K] = [0, {1 / max(num_tasks, 1):.4g}]"),
        ):
            if not ok:
                raise ValueError(f"coba.{name} = {value!r} is out of range: must be {rule}")
        self.num_tasks = num_tasks
        self.warmup = warmup
        self.history = history
        self.tau = tau
        self.update_interval = update_interval
        self.floor = floor
        self._reset()

    def _reset(self) -> None:
        self._initial: list[float | None] = [None] * self.num_tasks
        self._window_steps: deque[int] = deque(maxlen=self.history)
        self._window_losses: deque[list[float | None]] = deque(maxlen=self.history)  # r_k, None = absent
        self._slope_history: deque[list[float | None]] = deque(maxlen=self.history)
        self._max_slopes: list[float] = []  # α_max since warm-up, for DF
        self._weights = torch.full((self.num_tasks,), 1 / self.num_tasks, dtype=_F64)
        self._last_step: int | None = None
        self._diagnostics: dict[str, list[float | None]] = {}

    def due(self, step: int) -> bool:
        """Whether to probe after `step` optimizer steps (step 0, before training, is due)."""
        return step % self.update_interval == 0

    def observe(self, step: int, losses: Sequence[float | None] | torch.Tensor) -> torch.Tensor:
        """Record one probe evaluation and update the weights.

        Args:
            step: Optimizer steps done; larger than at the previous call.
            losses: Raw mean probe loss of each task, shape (K,); None or NaN (also ±inf) for a
                task absent from this probe. A task's first value is its initial loss.

        Returns:
            The new weights, float32, shape (K,), summing to 1 (uniform while `step < warmup`).

        Raises:
            ValueError: For a step not after the previous one, K values expected, a negative
                loss, or an initial loss of 0.
        """
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"CoBa probe at step {step} does not follow the previous one at {self._last_step}"
            )
        self._record(step, _as_losses(losses, self.num_tasks))
        slopes = self._window_slopes()
        self._diagnostics = {"slopes": slopes}
        weights = torch.full((self.num_tasks,), 1 / self.num_tasks, dtype=_F64)
        if step >= self.warmup:
            self._slope_history.append(slopes)
            weights = self._balance(slopes)
        self._weights = weights
        self._last_step = step
        return self.weights

    @property
    def weights(self) -> torch.Tensor:
        """The current weights, float32, shape (K,), summing to 1 (kept in float64 inside)."""
        return self._weights.float()

    def diagnostics(self) -> dict[str, list[float]]:
        """Values of the last probe for logging, NaN for tasks without a slope.

        Returns:
            `slopes` (K values), and after warm-up `rcs`, `acs` (K values each) and `df` (one).
        """
        return {
            key: [math.nan if v is None else v for v in values] for key, values in self._diagnostics.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """The whole state, JSON-serialisable (floats, ints, None and lists of them)."""
        return {
            "num_tasks": self.num_tasks,
            "initial_losses": list(self._initial),
            "window_steps": list(self._window_steps),
            "window_losses": [list(row) for row in self._window_losses],
            "slope_history": [list(row) for row in self._slope_history],
            "max_slope_history": list(self._max_slopes),
            "weights": self._weights.tolist(),
            "last_step": self._last_step,
            "diagnostics": {key: list(values) for key, values in self._diagnostics.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; later probes then give bitwise the same weights.

        Raises:
            ValueError: If the state was saved for another number of tasks.
        """
        if state["num_tasks"] != self.num_tasks:
            raise ValueError(f"CoBa state is for {state['num_tasks']} tasks, this run has {self.num_tasks}")
        self._reset()
        self._initial = list(state["initial_losses"])
        self._window_steps.extend(state["window_steps"])
        self._window_losses.extend(list(row) for row in state["window_losses"])
        self._slope_history.extend(list(row) for row in state["slope_history"])
        self._max_slopes = list(state["max_slope_history"])
        self._weights = torch.tensor(state["weights"], dtype=_F64)
        self._last_step = state["last_step"]
        self._diagnostics = {key: list(values) for key, values in state["diagnostics"].items()}

    def _record(self, step: int, losses: list[float | None]) -> None:
        for task, loss in enumerate(losses):
            if loss == 0 and self._initial[task] is None:
                raise ValueError(
                    f"the first CoBa probe loss of task {task} is 0; losses cannot be normalised by it"
                )
        for task, loss in enumerate(losses):
            if loss is not None and self._initial[task] is None:
                self._initial[task] = loss
        ratios = [
            None if loss is None else loss / initial
            for loss, initial in zip(losses, self._initial, strict=True)
        ]
        self._window_steps.append(step)
        self._window_losses.append(ratios)

    def _window_slopes(self) -> list[float | None]:
        steps = list(self._window_steps)
        slopes: list[float | None] = []
        for task in range(self.num_tasks):
            points = [
                (s, row[task])
                for s, row in zip(steps, self._window_losses, strict=True)
                if row[task] is not None
            ]
            slopes.append(_fit_slope(points))
        return slopes

    def _balance(self, slopes: list[float | None]) -> torch.Tensor:
        """Steps 2-6 of the module docstring (also records α_max); returns float64 weights."""
        active = [k for k, slope in enumerate(slopes) if slope is not None]
        weights = torch.full((self.num_tasks,), 1 / self.num_tasks, dtype=_F64)
        if not active:
            return weights
        current = torch.tensor([slopes[k] for k in active], dtype=_F64)
        self._max_slopes.append(float(current.max()))
        history = torch.tensor(
            [[math.nan if row[k] is None else row[k] for k in active] for row in self._slope_history],
            dtype=_F64,
        )
        rcs = _relative_scores(current)
        acs = _absolute_scores(history)
        df = _divergence_factor(self._max_slopes, self.tau)
        num_active = len(active)
        mixed = torch.softmax(num_active * (df * rcs + (1 - df) * acs), dim=0)
        weights[active] = mixed * (num_active / self.num_tasks)
        self._diagnostics.update(
            rcs=_scatter(rcs, active, self.num_tasks), acs=_scatter(acs, active, self.num_tasks), df=[df]
        )
        return _apply_floor(weights, self.floor)


def _as_losses(losses: Sequence[float | None] | torch.Tensor, num_tasks: int) -> list[float | None]:
    values = losses.detach().cpu().double().tolist() if isinstance(losses, torch.Tensor) else list(losses)
    if len(values) != num_tasks:
        raise ValueError(f"CoBa got {len(values)} probe losses, expected one per task ({num_tasks})")
    result = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
    if any(v is not None and v < 0 for v in result):
        raise ValueError(f"CoBa probe losses must not be negative, got {values}")
    return result


def _fit_slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of (step, value) points; None with fewer than 2 (steps are distinct)."""
    if len(points) < 2:
        return None
    x = torch.tensor([p[0] for p in points], dtype=_F64)
    y = torch.tensor([p[1] for p in points], dtype=_F64)
    dx = x - x.mean()  # centring keeps large step numbers from cancelling out
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


def _normalised(values: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """values / total, taken as 0 where total is 0 (then values are 0 too)."""
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, values / safe, torch.zeros_like(values))


def _relative_scores(slopes: torch.Tensor) -> torch.Tensor:
    """RCS over the m tasks with a slope, shape (m,)."""
    return torch.softmax(slopes.numel() * _normalised(slopes, slopes.abs().sum()), dim=0)


def _absolute_scores(history: torch.Tensor) -> torch.Tensor:
    """ACS from the slope history, shape (n, m) with NaN where a task had no slope; last row is now."""
    present = ~history.isnan()
    count = present.sum(dim=0).to(_F64)
    total = torch.where(present, history.abs(), 0.0).sum(dim=0)
    return torch.softmax(-count * _normalised(history[-1], total), dim=0)


def _divergence_factor(max_slopes: Sequence[float], tau: float) -> float:
    """DF from the history of the largest task slope, clamped to [0, 1]."""
    slopes = torch.tensor(max_slopes, dtype=_F64)
    count = slopes.numel()
    logits = -tau * count * _normalised(slopes, slopes.abs().sum())  # |logit| <= tau * count
    return min(max(count * float(torch.softmax(logits, dim=0)[-1]), 0.0), 1.0)


def _apply_floor(weights: torch.Tensor, floor: float) -> torch.Tensor:
    """w_k = max(floor, c · w_k) with c such that Σ w = 1; needs K · floor <= 1."""
    floored = torch.zeros_like(weights, dtype=torch.bool)
    # Raising a weight to the floor lowers c, which may push others below it: repeat until none
    # does. The floored set only grows, so this ends within K rounds.
    while not floored.all():
        scale = (1 - floor * int(floored.sum())) / weights[~floored].sum()  # in the weights' float64
        newly = ~floored & (weights * scale < floor)
        if not newly.any():
            return torch.where(floored, torch.full_like(weights, floor), weights * scale)
        floored |= newly
    return torch.full_like(weights, 1 / weights.numel())  # K · floor == 1


def _scatter(values: torch.Tensor, active: list[int], num_tasks: int) -> list[float | None]:
    result: list[float | None] = [None] * num_tasks
    for k, value in zip(active, values.tolist(), strict=True):
        result[k] = value
    return result
