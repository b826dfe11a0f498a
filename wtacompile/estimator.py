r"""Row selection for the sampled weight gradient (pure torch, no autograd).

A linear layer ``Y = X Wᵀ + b`` with ``X`` flattened to ``(N, D)`` has the weight gradient

.. math::

    dW = dYᵀ X = \sum_{i=1}^{N} dY_iᵀ X_i ,

a sum of one outer product per token row. Instead of saving all of ``X`` for backward we keep
``k ≪ N`` rows, each multiplied by a scale, so that

.. math::

    \widehat{dW} = \sum_{t=1}^{k} s_t \, dY_{i_t}ᵀ X_{i_t},  \qquad  E[\widehat{dW}] = dW .

Only the compact pre-scaled rows ``s_t X_{i_t}`` (``k × D``) and the indices ``i_t`` are saved;
``dY`` arrives whole in backward and is gathered with the same indices.

Methods (``p_i`` are selection probabilities proportional to the row scores):

``"crs"``
    Column-row sampling: ``k`` i.i.d. draws with replacement, ``P(i_t = i) = p_i``,
    ``s_t = 1 / (k p_{i_t})``. Unbiased because
    ``E[s_t dY_{i_t}ᵀ X_{i_t}] = Σ_i p_i · dY_iᵀX_i / (k p_i) = dW / k`` for each of the ``k`` draws,
    provided ``p_i > 0`` wherever ``X_i ≠ 0`` (rows with ``X_i = 0`` contribute nothing).

``"wtacrs"`` (default)
    Winner-take-all CRS. The ``c`` rows with the largest ``p`` (the set ``C``, mass ``P_C``) are
    kept exactly with ``s = 1``; the other ``k − c`` slots are i.i.d. draws from the remaining rows
    with probabilities ``p_i / (1 − P_C)`` and ``s_t = (1 − P_C) / ((k − c) p_{i_t})``. The winners'
    part is exact and the residual part is CRS on the residual sum, so the whole is unbiased.
    ``c`` is chosen per call to minimise ``(1 − P_{top c}) / (k − c)`` over ``c = 0 … k−1``
    (``c = 0`` is plain CRS with value ``1/k``), the variance proxy of the reference implementation.

``"uniform"``
    CRS with equal probabilities ``p_i = 1/N`` (``s = N/k``). Unbiased; the baseline.

``"topk"``
    The ``k`` highest-scoring rows with ``s = 1``. Deterministic and **biased** (it drops the
    residual sum); for ablations only.

Scores are whatever the caller passes: the rows' L2 norms ``‖X_i‖``, or (by default under the
backend and :func:`wtacompile.sample_linears`) ``‖X_i‖`` times a learned prediction of ``‖dY_i‖``
(:mod:`wtacompile.grad_predictor`) — the optimal CRS probabilities are ``∝ ‖X_i‖·‖dY_i‖``, but
``dY`` is unknown when the rows must be chosen in forward.

Edge cases (the same in both implementations, :func:`select_rows_on_host` and the
sync-free :func:`select_rows_on_device`; every shape is fixed by ``k``):

* All scores zero: ``X = 0`` so ``dW = 0``; probabilities fall back to uniform.
* Rows whose score is NaN/Inf (a non-finite value in ``X``) are always kept, as winners with
  ``s = 1``, so a non-finite value reaches the weight gradient exactly as in the dense op
  (AMP's ``GradScaler`` relies on seeing it). The sampler itself never sees a NaN probability.
  With more such rows than ``k``, the first ``k`` of them (in row order) fill every slot.
* If the residual mass is zero (every unkept row is all-zero) the residual slots get ``s = 0``:
  the winners alone are the exact gradient.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

METHODS: tuple[str, ...] = ("wtacrs", "crs", "uniform", "topk")
UNBIASED_METHODS: tuple[str, ...] = ("wtacrs", "crs", "uniform")
DEFAULT_MIN_ROWS = 10  # the reference implementation's floor on k
_TINY = torch.finfo(torch.float32).tiny


class RowSelection(NamedTuple):
    """Which rows to keep and how to weight them: ``dW ≈ Σ_t scale[t]·dY[index[t]]ᵀ X[index[t]]``."""

    index: torch.Tensor  # (k,) int64
    scale: torch.Tensor  # (k,) float32


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")


def validate_sampling_args(keep_ratio: float, method: str, min_rows: int) -> None:
    """Raise ``ValueError`` naming the fix for an out-of-range ratio, unknown method or bad floor."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if not (0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(
            f"keep_ratio must be in (0, 1], got {keep_ratio!r}; use 1.0 for the exact (dense) "
            "weight gradient and e.g. 0.3 to keep 30% of the rows"
        )
    _check_method(method)
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ValueError(f"min_rows must be a positive int, got {min_rows!r}")


def _as_fraction(keep_ratio: float) -> Fraction:
    # 0.3 * 10 is 3.0000000000000004 in floats; ceil() of that would keep one row too many.
    return Fraction(keep_ratio).limit_denominator(1 << 16)


def num_kept_rows(n, keep_ratio: float, min_rows: int):
    """``k = min(N, max(ceil(keep_ratio·N), min_rows))``, in exact rational arithmetic.

    Works on ints and on ``SymInt`` (the fake implementation uses it under dynamic shapes), so the
    real and the fake kernel agree on ``k`` by construction.
    """
    ratio = _as_fraction(keep_ratio)
    ceil_kn = -((-n * ratio.numerator) // ratio.denominator)
    if isinstance(n, int):
        return min(n, max(ceil_kn, min_rows))
    return torch.sym_min(n, torch.sym_max(ceil_kn, min_rows))


def select_rows(
    scores: torch.Tensor,
    k: int,
    method: str = "wtacrs",
    generator: torch.Generator | None = None,
) -> RowSelection:
    """Choose ``k`` of the ``N = scores.numel()`` rows; see the module docstring for the math.

    ``scores`` are non-negative per-row importance scores (row norms); non-finite scores mark rows
    that are always kept. Returns int64 indices and float32 scales, both of length ``k``.

    Two implementations of the same estimator: on a CPU, :func:`select_rows_on_host` (numpy, the
    number of winners read out, ~15 array ops); elsewhere :func:`select_rows_on_device` (torch,
    no host sync, ~40 ops of fixed shape, so a GPU never waits on a draw). A draw is a few dozen
    ops on ``N`` numbers, so on a CPU each op's fixed cost is most of it: the host version takes
    a third to a half of the torch version's time at 256–1024 rows. Both take their random
    numbers from torch's generator (``torch.manual_seed`` reproduces a draw).
    """
    _check_method(method)
    if scores.device.type == "cpu":
        return select_rows_on_host(scores, k, method, generator)
    return select_rows_on_device(scores, k, method, generator)


def _keep_all(n: int, device: torch.device) -> RowSelection:
    return RowSelection(torch.arange(n, device=device), torch.ones(n, device=device, dtype=torch.float32))


def select_rows_on_host(
    scores: torch.Tensor,
    k: int,
    method: str = "wtacrs",
    generator: torch.Generator | None = None,
) -> RowSelection:
    """:func:`select_rows` for CPU tensors, in numpy (float64), slicing where the device version
    masks. Residual draws are inverse-CDF lookups of ``torch.rand`` numbers in the residual
    weights' running sum, which never land on a zero-weight row."""
    _check_method(method)
    if scores.device.type != "cpu":
        raise ValueError(f"select_rows_on_host needs CPU scores, got {scores.device}; use select_rows")
    values = scores.detach().reshape(-1).to(torch.float64).numpy()
    n = values.size
    if k >= n:
        return _keep_all(n, scores.device)
    finite = np.isfinite(values)
    if method == "uniform":
        weights = finite.astype(np.float64)
    else:
        weights = np.where(finite, np.maximum(values, 0.0), 0.0)
        if not weights.any():  # all-zero (finite) rows: uniform, as on the device
            weights = finite.astype(np.float64)
    # Non-finite rows first, then by weight, ties in row order: the device version's stable sort.
    order = np.argsort(np.where(finite, -weights, -np.inf), kind="stable")
    sorted_weights = weights[order]  # forced rows weigh 0: kept, never drawn
    min_winners = min(n - int(finite.sum()), k)

    if method == "topk":
        num_winners = k
    elif method == "wtacrs":
        residual_mass = np.cumsum(sorted_weights[::-1])[::-1][:k + 1]  # Σ_{j ≥ c} w_(j), c = 0..k
        objective = np.empty(k + 1)
        objective[:k] = residual_mass[:k] / np.arange(k, 0, -1)
        objective[k] = 0.0 if residual_mass[k] == 0 else np.inf
        objective[:min_winners] = np.inf
        num_winners = max(int(np.argmin(objective)), min_winners)
    else:
        num_winners = min_winners

    index = np.empty(k, dtype=np.int64)
    scale = np.ones(k, dtype=np.float32)
    index[:num_winners] = order[:num_winners]
    num_draws = k - num_winners
    if num_draws:
        residual = sorted_weights[num_winners:]
        running = np.cumsum(residual)
        total = running[-1]
        if total > 0:
            uniform = torch.rand(num_draws, generator=generator, dtype=torch.float64).numpy()
            # u·total < total, unless rounding reaches it: then the last row with weight.
            picks = np.minimum(np.searchsorted(running, uniform * total, side="right"),
                               np.flatnonzero(residual)[-1])
            index[num_winners:] = order[num_winners + picks]
            scale[num_winners:] = total / (num_draws * residual[picks])
        else:  # nothing left to sample: the winners are the exact gradient
            index[num_winners:] = order[num_winners + np.arange(num_draws) % residual.size]
            scale[num_winners:] = 0.0
    return RowSelection(torch.from_numpy(index), torch.from_numpy(scale))


def select_rows_on_device(
    scores: torch.Tensor,
    k: int,
    method: str = "wtacrs",
    generator: torch.Generator | None = None,
) -> RowSelection:
    """:func:`select_rows` in torch ops of fixed shape, without host synchronisation (any device;
    what a GPU runs)."""
    _check_method(method)
    scores = scores.float()
    n = scores.numel()
    device = scores.device
    if k >= n:
        return _keep_all(n, device)

    # One pass of ~40 small ops whatever the data, all shapes fixed by N and k: no host sync, so
    # a GPU never waits on a draw; masks stand in for the slices a data-dependent c would allow.
    finite = scores.abs() < torch.inf  # False for NaN and ±inf
    if method == "uniform":
        weights = finite.float()
    else:
        weights = torch.where(finite, scores.clamp_min(0.0), 0.0)
        weights = weights / weights.amax().clamp_min(_TINY)  # at most 1: sums cannot overflow
        # All-zero (finite) rows: X has no mass there, any unbiased rule works; use uniform.
        weights = torch.where(weights.sum() > 0, weights, finite.float())

    # Non-finite rows sort first (key +inf), then by weight; the winners are a prefix of this
    # order. Every ratio below is scale-free: the weights need not sum to 1.
    sorted_key, order = torch.sort(torch.where(finite, weights, torch.inf), descending=True, stable=True)
    sorted_weights = sorted_key.nan_to_num(posinf=0.0)  # forced rows: kept, never drawn
    num_forced = n - finite.sum()

    positions = torch.arange(k + 1, device=device)
    # Σ_{j ≥ c} w_(j), c = 0..k, as suffix sums: no cancellation where little mass is left.
    tail = sorted_weights[k:].sum().reshape(1)
    residual_mass = torch.cat([sorted_weights[:k].flip(0).cumsum(0).flip(0) + tail, tail])

    min_winners = torch.clamp(num_forced, max=k)
    if method == "topk":
        num_winners = torch.full((), k, device=device)
    elif method == "wtacrs":
        # (W − W_{top c}) / (k − c) for c < k. c = k (no residual draws) is allowed only when no
        # mass is left (0/0 → 0) or every slot is forced (the floor below); otherwise its
        # x/0 = inf rules it out.
        objective = (residual_mass / (k - positions)).nan_to_num(nan=0.0, posinf=torch.inf)
        objective = torch.where(positions < min_winners, torch.inf, objective)
        # All inf only when every slot is forced: argmin's 0 is then floored to k.
        num_winners = torch.maximum(torch.argmin(objective), min_winners)
    else:  # crs, uniform: winners only where forced (non-finite rows)
        num_winners = min_winners

    # Residual draws: from rows at sorted position >= c, proportionally to their weights.
    not_winner = torch.arange(n, device=device) >= num_winners
    residual = torch.where(not_winner, sorted_weights, 0.0)
    residual_total = residual.sum()
    has_residual_mass = residual_total > 0
    draw_weights = torch.where(has_residual_mass, residual, not_winner.float())
    draws = torch.multinomial(draw_weights, k, replacement=True, generator=generator)

    slot = positions[:k]
    is_winner_slot = slot < num_winners
    index = order[torch.where(is_winner_slot, slot, draws)]
    # A drawn row has weight > 0 whenever there is residual mass (multinomial never picks a zero);
    # without it the slots scale by 0 and the winners alone are the exact gradient. Winner slots'
    # x/0 (c = k) is discarded by the outer where.
    residual_scale = residual_total / ((k - num_winners) * sorted_weights[draws])
    scale = torch.where(is_winner_slot, 1.0, torch.where(has_residual_mass, residual_scale, 0.0))
    return RowSelection(index, scale.float())

