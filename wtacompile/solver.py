r"""The global memory-budget solver: numbers in, keep ratios out (no torch, no graphs).

Problem. There are G *groups*: sets of sampled linears that read one saved input (q/k/v share
one; most linears are alone). Group g keeps ``dense_bytes[g]`` for backward when exact; at keep
ratio ``r`` from a menu it keeps ``sampled_bytes[g][r]`` (the compact rows and indices of each
member) instead. Choose one option per group to

.. math::

    \min \sum_g c_g \left(\frac{1}{r_g} - 1\right)
    \quad \text{s.t.} \quad \sum_g \text{bytes}_g(r_g) \le \text{capacity},

the capacity being the budget minus everything sampling cannot change (parameters, gradients,
optimizer state, the other saved activations, the backward transient).

Variance model. For the CRS family with ``k = rN`` rows, the weight-gradient estimate's variance
is ``≈ (1/r − 1)·Σ_i ‖X_i‖²‖dY_i‖²`` (zero at ``r = 1``); relative to ``‖dW‖²`` that is
``≈ (1/r − 1)`` for weakly correlated rows. Weighting each layer by its parameter count,
``c_g = Σ_{members} in·out`` gives the expected squared error summed over parameters. Callers
with activation statistics can pass any other ``c_g``.

Algorithm. A multiple-choice knapsack, solved exactly by dynamic programming over memory
discretised to ``resolution`` units. Item sizes are rounded *up*, so every solution the DP
returns truly fits; the optimum is exact for the discretised sizes (the only approximation is
that rounding, ``capacity/resolution`` per group at most). Options that do not reduce memory
below the group's exact bytes are never offered: sampling where it frees nothing costs variance
for nothing. ``O(G · options · resolution)`` in vectorised numpy: ~224 groups × 6 options ×
4096 units takes milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

__all__ = ["DEFAULT_BUDGET_MENU", "DEFAULT_MENU", "GroupChoice", "Solution", "fastest_fitting", "first_fitting",
           "largest_fitting", "solve", "variance_cost"]

DEFAULT_MENU: tuple[float, ...] = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
#: Partitioner budgets (torch's ``activation_memory_budget``) a memory budget may choose from: the
#: largest at which the ratios can fit is the one that recomputes least. Tried from the top
#: (:func:`first_fitting`): most memory budgets need no recompute or a little, so steps of 0.1
#: let a user with X GB pay for no more recompute than X asks, at one analysis per step down to
#: the answer, and one more where it stays dense (:func:`fastest_fitting`; measured in
#: ``benchmarks/bench_joint.py``).
DEFAULT_BUDGET_MENU: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

Result = TypeVar("Result")


def largest_fitting(budgets: Sequence[float], attempt: Callable[[float], Result | None]
                    ) -> tuple[float, Result] | None:
    """The largest of ``budgets`` at which ``attempt`` succeeds (returns a result, not ``None``),
    with that result; ``None`` if no attempt did.

    For cheap attempts whose success is monotone in the budget: bisected, ``⌈log2(n + 1)⌉``
    attempts for ``n`` budgets. Where success is not monotone the answer may be a smaller budget
    that fits, never one that does not: it is always an attempted success.
    """
    ordered = sorted(budgets, reverse=True)
    best: tuple[float, Result] | None = None
    low, high = 0, len(ordered)  # the answer's index lies in [low, high]; high: none found yet
    while low < high:
        middle = (low + high) // 2
        result = attempt(ordered[middle])
        if result is None:
            low = middle + 1
        else:
            best, high = (ordered[middle], result), middle
    return best


def first_fitting(budgets: Sequence[float], attempt: Callable[[float], Result | None]
                  ) -> tuple[float, Result] | None:
    """The largest of ``budgets`` at which ``attempt`` succeeds, tried from the largest down.

    For a predicted peak, whose fit is not monotone in the partitioner budget (the knapsack is
    lumpy: measured, torch alone peaks higher at 0.3 than at 0.4 on the frontier's Llama, whose
    plan fits at 0.6 but not at 0.3, so an earlier galloping search, 0.9, 0.7, 0.3, 0.1, fell
    to 0.1): the answer is the true largest, at the cost of one attempt per budget above it.
    When nothing fits, the last attempt is at the smallest budget.
    """
    for budget in sorted(budgets, reverse=True):
        result = attempt(budget)
        if result is not None:
            return budget, result
    return None


def fastest_fitting(budgets: Sequence[float], attempt: Callable[[float], Result | None],
                    samples: Callable[[Result], bool], step_time: Callable[[Result], float]
                    ) -> tuple[float, Result] | None:
    """The largest of ``budgets`` at which ``attempt`` succeeds (:func:`first_fitting`), unless
    that answer samples nothing and the next lower budget that fits samples and is predicted
    faster.

    Why: at a budget just below 1 a sampled partition can save more than the dense one (its
    knapsack balances a smaller range of bytes), so the largest budget that fits is compiled
    dense — torch's own choice. A lower budget with sampling recomputes more but runs its
    weight gradients on the kept rows; measured on the frontier's Llama at X = 0.9, that was
    0.84× the dense choice's time. ``step_time`` decides (the time model's prediction).
    """
    found = first_fitting(budgets, attempt)
    if found is None or samples(found[1]):
        return found
    # Only the next lower budget that fits: where it stays dense too (the solver found exact
    # enough), budgets further down would recompute more for nothing — one attempt, not eight.
    lower = first_fitting([b for b in budgets if b < found[0]], attempt)
    if lower is not None and samples(lower[1]) and step_time(lower[1]) < step_time(found[1]):
        return lower
    return found


@dataclass(frozen=True)
class GroupChoice:
    """One group's options: exact bytes, and bytes at each sampled ratio of the menu."""

    name: str
    dense_bytes: int
    sampled_bytes: dict[float, int]  # ratio (< 1) -> bytes kept at that ratio
    cost_weight: float  # c_g of the variance model


@dataclass(frozen=True)
class Solution:
    """The solver's decision: a ratio per group (1.0 = exact), bytes kept and total variance."""

    ratios: dict[str, float]
    bytes: int
    variance: float
    feasible: bool
    min_bytes: int  # the least memory any choice reaches (every group at its smallest option)


def variance_cost(cost_weight: float, ratio: float) -> float:
    """``c·(1/r − 1)``: zero for the exact gradient, growing as fewer rows are kept."""
    return cost_weight * (1.0 / ratio - 1.0)


def _options(group: GroupChoice) -> list[tuple[float, int]]:
    options = [(1.0, group.dense_bytes)]
    for ratio, nbytes in sorted(group.sampled_bytes.items(), reverse=True):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"group {group.name!r}: sampled ratio {ratio} must be in (0, 1)")
        if nbytes < group.dense_bytes:  # never sample where it frees nothing
            options.append((ratio, nbytes))
    return options


def solve(groups: Sequence[GroupChoice], capacity: int, *, resolution: int = 4096) -> Solution:
    """Choose a ratio per group minimising total variance with total bytes ≤ ``capacity``.

    Infeasible (even the smallest options exceed ``capacity``): returns ``feasible=False`` with
    every group at its smallest option, so the caller can report how far off the budget is.
    """
    options = [_options(g) for g in groups]
    min_bytes = sum(min(b for _, b in opts) for opts in options)
    max_bytes = sum(g.dense_bytes for g in groups)
    if not groups:
        return Solution({}, 0, 0.0, capacity >= 0, 0)
    if capacity >= max_bytes:  # everything exact fits: no sampling at all
        return Solution({g.name: 1.0 for g in groups}, max_bytes, 0.0, True, min_bytes)
    if capacity < min_bytes:
        ratios = {g.name: min(opts, key=lambda o: o[1])[0] for g, opts in zip(groups, options)}
        variance = sum(variance_cost(g.cost_weight, ratios[g.name]) for g in groups)
        return Solution(ratios, min_bytes, variance, False, min_bytes)

    unit = max(1, math.ceil(capacity / resolution))
    slots = capacity // unit
    inf = np.inf
    # best[m] = least variance with at most m units used, over the groups seen so far.
    best = np.zeros(slots + 1)
    picks = np.zeros((len(groups), slots + 1), dtype=np.int8)
    for gi, (group, opts) in enumerate(zip(groups, options)):
        new_best = np.full(slots + 1, inf)
        new_pick = np.zeros(slots + 1, dtype=np.int8)
        for oi, (ratio, nbytes) in enumerate(opts):
            size = math.ceil(nbytes / unit)
            if size > slots:
                continue
            candidate = np.full(slots + 1, inf)
            candidate[size:] = best[: slots + 1 - size] + variance_cost(group.cost_weight, ratio)
            better = candidate < new_best
            new_best[better] = candidate[better]
            new_pick[better] = oi
        best, picks[gi] = new_best, new_pick
    if not np.isfinite(best[slots]):  # rounding up made the tightest fit infeasible
        ratios = {g.name: min(opts, key=lambda o: o[1])[0] for g, opts in zip(groups, options)}
        variance = sum(variance_cost(g.cost_weight, ratios[g.name]) for g in groups)
        return Solution(ratios, min_bytes, variance, min_bytes <= capacity, min_bytes)

    ratios, used_bytes, m = {}, 0, slots
    for gi in range(len(groups) - 1, -1, -1):
        ratio, nbytes = options[gi][picks[gi, m]]
        ratios[groups[gi].name] = ratio
        used_bytes += nbytes
        m -= math.ceil(nbytes / unit)
    variance = sum(variance_cost(g.cost_weight, ratios[g.name]) for g in groups)
    return Solution(dict(reversed(list(ratios.items()))), used_bytes, variance, True, min_bytes)
