r"""The memory model: recorded numbers in, predicted bytes out (no graphs, no tracing).

Shared by :func:`wtacompile.plan` and the backend's ``mem_gb`` option. The graph adapter
(:mod:`wtacompile.analysis.graph_numbers`) turns each captured graph into a :class:`GraphMemory`
and each sampleable input into a :class:`SampleableInput`; everything here is arithmetic on them,
so it is tested from hand-written numbers.

Sizes depend on the batch ``b``. A :class:`Size` is exact at the traced batch ``b₀`` and affine
elsewhere: ``traced + per_batch·(b − b₀)`` when the graph was captured with a symbolic batch
dimension (the slope is read off a symbolic trace, or off static traces at ``b₀`` and ``b₀ + 1``),
else ``traced·b/b₀`` (proportional scaling).

Model (bytes, at batch ``b``)::

    resident   = parameters + optimizer state            (state: k × trainable, k = 2 for Adam)
    train peak = resident + saved activations + backward transient
    step peak  = resident + gradients (trainable only) + optimizer-step temporaries
    peak       = max(train peak, step peak)

* saved activations — what the partitioner saves for backward, parameters excluded; a sampled
  input is replaced by one compact copy of its kept rows and their indices, which every linear
  reading it shares;
* backward transient — what the backward needs beyond the saved activations at its worst moment.
  Graphs run backward in reverse order: while graph ``g``'s backward runs, the graphs before it
  still hold their saved activations, so the transient is
  ``max_g (Σ_{h<g} act_h + peak_g) − Σ_h act_h`` with ``peak_g`` graph ``g``'s own live peak;
* optimizer-step temporaries — twice the largest trainable parameter (the per-parameter loop's
  ``sqrt``/``div`` buffers) for optimizers with state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from wtacompile.config import OPTIMIZER_STATES
from wtacompile.estimator import num_kept_rows
from wtacompile.solver import GroupChoice
from wtacompile.time_model import SampledLinear

__all__ = [
    "Allocation",
    "GraphMemory",
    "MemoryModel",
    "Reader",
    "SampleableInput",
    "Size",
    "compact_bytes",
    "format_bytes",
    "parameter_bytes",
]

INDEX_BYTES = 8  # int64 row indices


@dataclass(frozen=True)
class Size:
    """Bytes as a function of the batch: exact at the traced batch, affine elsewhere.

    ``per_batch=None`` marks a static trace: the size is assumed proportional to the batch.
    """

    traced: int
    per_batch: int | None = None

    def at(self, batch: int | None, trace_batch: int) -> float:
        if batch is None or batch == trace_batch:
            return self.traced
        if self.per_batch is None:
            return self.traced * batch / trace_batch
        return self.traced + self.per_batch * (batch - trace_batch)

    def __add__(self, other: Size) -> Size:
        return Size(self.traced + other.traced, _combine(self.per_batch, other.per_batch, 1))

    def __sub__(self, other: Size) -> Size:
        return Size(self.traced - other.traced, _combine(self.per_batch, other.per_batch, -1))

    def __mul__(self, copies: int) -> Size:
        return Size(self.traced * copies, None if self.per_batch is None else self.per_batch * copies)

    def line(self, trace_batch: int) -> tuple[float, float]:
        """``(intercept, slope)``: the size at batch ``b`` is ``intercept + slope·b``."""
        if self.per_batch is None:
            return 0.0, self.traced / trace_batch
        return float(self.traced - self.per_batch * trace_batch), float(self.per_batch)


def _combine(a: int | None, b: int | None, sign: int) -> int | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("cannot combine sizes from a static and a symbolic trace")
    return a + sign * b


ZERO = Size(0)


@dataclass(frozen=True)
class Allocation:
    """One storage the backward graph allocates (or receives: saved tensors, tangents)."""

    owner: str  # module path
    size: Size
    last_point: int | None  # the last point of the live curve it is alive at; None: returned
    gradient_step: bool  # made by a gradient computation (not an input or a recomputed value)


@dataclass(frozen=True)
class GraphMemory:
    """One captured graph as the memory model sees it (dense partition, parameters excluded)."""

    activations: Size  # distinct storages saved for backward
    backward_live: tuple[Size, ...]  # live bytes after each allocation while the backward runs
    # Which module each number belongs to (dotted module paths, "" for none), for composing a
    # model from a few traced blocks (wtacompile.planning.blocks): the module of each saved storage,
    # and each backward allocation (one per point of backward_live).
    saved_owners: tuple[tuple[str, Size], ...] = ()
    allocations: tuple[Allocation, ...] = ()

    def backward_peak(self, batch: int | None, trace_batch: int) -> float:
        return max((s.at(batch, trace_batch) for s in self.backward_live), default=0)


@dataclass(frozen=True)
class Reader:
    """A linear that reads a sampleable input (its weight gradient is what sampling estimates)."""

    weight: str
    rows: int  # at the traced batch
    in_features: int
    out_features: int
    itemsize: int


@dataclass(frozen=True)
class SampleableInput:
    """A saved input that sampling releases: its bytes and the linears that read it (q/k/v: 3)."""

    key: str
    input_bytes: Size
    readers: tuple[Reader, ...]

    def bytes_at(self, batch: int | None, trace_batch: int) -> int:
        return int(self.input_bytes.at(batch, trace_batch))

    def sampled_linear(self) -> SampledLinear:
        """The time model's view of it (at the traced batch)."""
        first = self.readers[0]
        return SampledLinear(first.rows, first.in_features, first.itemsize,
                             tuple(r.out_features for r in self.readers))

    def compact_bytes_at(self, ratio: float, batch: int | None, trace_batch: int, min_rows: int) -> int:
        """The one compact copy its readers share (they read the same rows)."""
        scale = 1.0 if batch is None else batch / trace_batch  # rows are batch × sequence
        first = self.readers[0]
        return compact_bytes(max(1, round(first.rows * scale)), first.in_features, first.itemsize,
                             ratio, min_rows)


def format_bytes(nbytes: float) -> str:
    """Bytes in the unit that reads best (decimal, as budgets are: 1 GB = 1e9 bytes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale * 0.9995:  # what rounds to 1000 of a unit reads as 1 of the next
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value >= 999.5 else f"{value:.3g} {unit}"
    return f"{int(nbytes)} bytes"


def compact_bytes(rows: int, in_features: int, itemsize: int, ratio: float, min_rows: int) -> int:
    """Bytes the sampled op saves for one linear: ``k`` pre-scaled rows plus ``k`` int64 indices."""
    k = num_kept_rows(rows, ratio, min_rows)
    return k * in_features * itemsize + k * INDEX_BYTES


def parameter_bytes(parameters: Iterable, optimizer: str) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer state, optimizer-step temporaries) in bytes.

    ``parameters`` are tensors (anything with ``numel``, ``element_size``, ``requires_grad``);
    shared ones count once. Frozen parameters have no gradient and no state.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}")
    unique = {id(p): p for p in parameters}.values()
    sizes = [(p.numel() * p.element_size(), p.requires_grad) for p in unique]
    total = sum(n for n, _ in sizes)
    trainable = [n for n, grad in sizes if grad]
    states = OPTIMIZER_STATES[optimizer]
    temporaries = 2 * max(trainable, default=0) if states else 0
    return total, sum(trainable), states * sum(trainable), temporaries


@dataclass(frozen=True)
class MemoryModel:
    """Predicted bytes of one training step, from recorded numbers (see the module docstring)."""

    parameters: int
    gradients: int
    optimizer: int
    step_temporaries: int
    graphs: tuple[GraphMemory, ...]  # in forward order
    inputs: tuple[SampleableInput, ...]  # keys unique across graphs
    trace_batch: int
    min_rows: int

    def resident(self) -> int:
        return self.parameters + self.optimizer

    def step_peak(self) -> int:
        return self.resident() + self.gradients + self.step_temporaries

    def activations(self, batch: int | None) -> int:
        """Dense saved activations of all graphs at ``batch``."""
        return int(sum(g.activations.at(batch, self.trace_batch) for g in self.graphs))

    def transient(self, batch: int | None) -> int:
        """Backward transient at ``batch``, the graphs' backwards running in reverse order."""
        held = worst = 0.0
        for graph in self.graphs:
            worst = max(worst, held + graph.backward_peak(batch, self.trace_batch))
            held += graph.activations.at(batch, self.trace_batch)
        return int(max(worst - held, 0))

    def sampleable_bytes(self, batch: int | None) -> int:
        return sum(i.bytes_at(batch, self.trace_batch) for i in self.inputs)

    def fixed_at(self, batch: int | None) -> int:
        """Train-peak bytes that sampling cannot change, at ``batch``."""
        return (self.resident() + self.activations(batch) - self.sampleable_bytes(batch)
                + self.transient(batch))

    def choices_at(self, batch: int | None, menu: Sequence[float]) -> list[GroupChoice]:
        """One solver group per sampleable input: its exact bytes and bytes at each menu ratio.

        The variance weight is ``Σ in·out`` of its readers (see :mod:`wtacompile.solver`).
        """
        return [
            GroupChoice(
                i.key,
                i.bytes_at(batch, self.trace_batch),
                {r: i.compact_bytes_at(r, batch, self.trace_batch, self.min_rows) for r in menu if r < 1.0},
                float(sum(r.in_features * r.out_features for r in i.readers)),
            )
            for i in self.inputs
        ]

    def planned_activations(self, batch: int | None, ratios: Mapping[str, float]) -> int:
        """Saved activations with each input at its ratio (missing or 1.0: exact)."""
        total = self.activations(batch)
        for i in self.inputs:
            ratio = ratios.get(i.key, 1.0)
            if ratio < 1.0:
                total += i.compact_bytes_at(ratio, batch, self.trace_batch, self.min_rows)
                total -= i.bytes_at(batch, self.trace_batch)
        return total

    def peak(self, batch: int | None, ratios: Mapping[str, float] = {}) -> int:
        train = self.resident() + self.planned_activations(batch, ratios) + self.transient(batch)
        return max(train, self.step_peak())

    def peak_lines(self, ratio: float = 1.0) -> list[tuple[float, float]]:
        """The training peak at batch ``b`` as ``max_j (c_j + s_j·b)``, ``(c_j, s_j)`` listed,
        with every sampleable input at ``ratio`` (1.0: exact).

        Exact for a symbolic trace with ``ratio=1.0``; with sampling, ``k = r·N`` rows stand for
        ``max(⌈r·N⌉, min_rows)``, so the lines are a relaxation to be checked at the answer.
        ``train(b) = resident + max(A(b), max_{g,p} (H_g(b) + p(b))) + Σ_i (c_i(b) − x_i(b))``
        with ``A`` the saved activations, ``H_g`` those of the graphs before ``g``, ``p`` a point
        of graph ``g``'s backward live curve, ``x_i`` a sampled input and ``c_i`` its compact rows.
        """
        def line(size: Size) -> tuple[float, float]:
            return size.line(self.trace_batch)

        shift_c, shift_s = float(self.resident()), 0.0
        if ratio < 1.0:
            for i in self.inputs:
                c, s = line(i.input_bytes)
                first = i.readers[0]
                per_row = first.in_features * first.itemsize + INDEX_BYTES
                shift_c -= c
                shift_s += ratio * first.rows / self.trace_batch * per_row - s
        pieces = [_sum_lines(line(g.activations) for g in self.graphs)]
        held = (0.0, 0.0)
        for graph in self.graphs:
            pieces.extend((held[0] + c, held[1] + s) for c, s in map(line, graph.backward_live))
            c, s = line(graph.activations)
            held = (held[0] + c, held[1] + s)
        return [(c + shift_c, s + shift_s) for c, s in pieces]

    def batch_estimate(self, budget: int, ratio: float = 1.0) -> int:
        """The largest batch whose :meth:`peak_lines` fit ``budget`` (0 if none; a large number
        if no line grows). A first guess for the exact check: see :meth:`peak_lines`."""
        if self.step_peak() > budget:
            return 0
        bound = float("inf")
        for c, s in self.peak_lines(ratio):
            if s > 0:
                bound = min(bound, (budget - c) / s)
            elif c > budget:
                return 0
        return 0 if bound < 1 else (1 << 62 if bound == float("inf") else int(bound))


def _sum_lines(lines: Iterable[tuple[float, float]]) -> tuple[float, float]:
    c = s = 0.0
    for a, b in lines:
        c, s = c + a, s + b
    return c, s
