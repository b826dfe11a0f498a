r"""The step-time model: recorded costs in, a predicted time relative to dense training out.

Pure arithmetic (no graphs, no torch), shared by :func:`wtacompile.plan` and the backend's
``mem_gb`` option, which choose the partitioner budget together with the keep ratios: a budget
below 1 makes the partitioner recompute more in backward (time), sampling makes the weight
gradients cheaper (time saved). The graph adapter (:mod:`wtacompile.analysis.graph_cost`) counts
each partitioned graph's work as a :class:`GraphCost`.

Model. A step costs its compute-bound and its memory-bound work, in FLOP-equivalents::

    time = F + β·B

* ``F`` — FLOPs of the matmul-like ops (``mm``/``addmm``/``bmm``/attention/convolution) in the
  forward and backward graphs, recomputed ones included;
* ``B`` — bytes the other ops write (norms, activations, copies; views are free);
* ``β`` — the machine balance, FLOPs per byte at which both take equal time
  (:data:`MACHINE_BALANCE`: an H100's ~1000 TFLOP/s of bf16 over ~3.3 TB/s is ~300; two CPU cores
  with AVX-512 fp32 over their share of DRAM bandwidth, ~10).

Sampling input ``x`` (``N`` rows of ``D``, read by linears of ``out_j`` features each) at keep
ratio ``r`` (``k`` rows kept) changes it by::

    ΔF = −Σ_j 2·(N − k)·D·out_j                      (each dW GEMM runs on k rows, not N)
    ΔB = N·4 + k·(D·itemsize + 12) + Σ_j k·out_j·itemsize
         (fp32 row norms, the compact rows with their int64 index and fp32 scale, dY gathered)
       + N·(12 + Σ_j 4)      with gradient-aware scores (:mod:`wtacompile.grad_predictor`):
         each row's int32 cell, prediction and weight, and per reader the fp32 norms of dY's rows

It is a model, not a measurement: Inductor fuses memory-bound chains (``B`` overcounts them) and
small GEMMs run below peak. ``benchmarks/bench_frontier.py`` prints predicted beside measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["MACHINE_BALANCE", "GraphCost", "SampledLinear", "balance_for", "sampling_change", "step_time",
           "step_time_ratio"]

#: FLOPs per byte at which a device spends equal time on compute and on memory traffic.
MACHINE_BALANCE: dict[str, float] = {"cuda": 300.0, "cpu": 10.0}


@dataclass(frozen=True)
class GraphCost:
    """The work of one partitioned training graph (forward + backward, recomputation included).

    ``owners`` splits it by module path (dotted, "" for none) as ``(path, flops, bytes)``, so that
    a model planned from a few traced blocks can be composed (:mod:`wtacompile.planning.blocks`).
    """

    flops: float
    bytes: float
    owners: tuple[tuple[str, float, float], ...] = ()

    def time(self, balance: float) -> float:
        return self.flops + balance * self.bytes

    def __add__(self, other: GraphCost) -> GraphCost:
        return GraphCost(self.flops + other.flops, self.bytes + other.bytes, self.owners + other.owners)


@dataclass(frozen=True)
class SampledLinear:
    """What sampling one input changes: its rows, width, itemsize and its readers' widths."""

    rows: int
    in_features: int
    itemsize: int
    out_features: tuple[int, ...]
    gradient_aware: bool = False  # rows scored by a learned ‖dY‖ prediction (row_scores="gradient")


def sampling_change(linear: SampledLinear, kept_rows: int) -> tuple[float, float]:
    """``(ΔF, ΔB)`` of sampling ``linear``'s input down to ``kept_rows`` (see the module docstring)."""
    n, k, d = linear.rows, kept_rows, linear.in_features
    flops = -sum(2.0 * (n - k) * d * out for out in linear.out_features)
    nbytes = 4.0 * n + k * (d * linear.itemsize + 12) + sum(k * out * linear.itemsize
                                                            for out in linear.out_features)
    if linear.gradient_aware:
        nbytes += n * (12.0 + 4.0 * len(linear.out_features))
    return flops, nbytes


def step_time(costs: Iterable[GraphCost], sampled: Sequence[tuple[SampledLinear, int]],
              balance: float) -> float:
    """Predicted time (FLOP-equivalents) of the graphs ``costs`` with each ``(input, kept rows)``
    of ``sampled`` sampled. Compare two configurations by their ratio; the unit cancels."""
    total = sum(cost.time(balance) for cost in costs)
    for linear, kept in sampled:
        flops, nbytes = sampling_change(linear, kept)
        total += flops + balance * nbytes
    return total


def step_time_ratio(costs: Iterable[GraphCost], sampled: Sequence[tuple[SampledLinear, int]],
                    dense_costs: Iterable[GraphCost], balance: float) -> float:
    """:func:`step_time` of ``costs`` with ``sampled``, relative to ``dense_costs`` with nothing
    sampled (dense training at partitioner budget 1)."""
    dense = step_time(dense_costs, (), balance)
    return step_time(costs, sampled, balance) / dense if dense > 0 else 1.0


def balance_for(device_type: str, overrides: Mapping[str, float] | None = None) -> float:
    """The machine balance of a device type (``"cuda"``, ``"cpu"``; others are taken as GPUs)."""
    table = {**MACHINE_BALANCE, **(overrides or {})}
    return table.get(device_type, table["cuda"])
