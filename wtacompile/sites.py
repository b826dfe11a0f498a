"""The values that flow through the passes, one way: facts → analysis → decisions.

* :class:`LinearSite` — what :func:`~wtacompile.passes.find_linears` found: one linear-like node
  and its weight (frozen facts, written once).
* :class:`SavingsAnalysis` — what :func:`~wtacompile.passes.analyze_savings` learnt from the
  partitioned joint graph: which candidate inputs sampling releases, grouped by shared input,
  with their sizes. Names and bytes only; no ``fx.Node`` is kept.
* :class:`SiteDecision` — what :func:`~wtacompile.passes.choose_ratios` decided for each site.

None of them changes after it is made; the report is built from them at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wtacompile.memory_model import GraphMemory, Reader, SampleableInput, Size
from wtacompile.time_model import GraphCost, SampledLinear

__all__ = [
    "ADDS_MEMORY",
    "FREES",
    "FREES_NOTHING",
    "SKIPPED",
    "InputGroup",
    "LinearSite",
    "SavingsAnalysis",
    "SiteDecision",
    "sampled_linear",
]

# Verdicts.
FREES = "frees"  # nothing else keeps the input for backward: sampling frees its bytes
FREES_NOTHING = "frees-nothing"  # dense training would not keep the input either
ADDS_MEMORY = "adds-memory"  # another backward keeps the full input: sampling would only add
SKIPPED = "skipped"  # not a candidate (frozen weight, excluded by pattern, ratio 1.0), or exact by plan


CHECKPOINTED_REASON = ("inside an activation-checkpointed region: its input is recomputed, not "
                       "saved; left exact")


@dataclass(frozen=True)
class LinearSite:
    """One linear-like node of a captured graph whose weight is a 2-D parameter."""

    node: str  # node name in the dynamo graph
    weight: str  # parameter FQN (a second use of a tied weight gets "#1", ...)
    op: str  # "linear", "addmm", "mm" or "matmul"
    weight_layout: str  # "out_in" (F.linear) or "in_out" (addmm/matmul: x @ W)
    input_shape: tuple[int, ...]
    dtype: str
    itemsize: int
    rows: int  # N: rows of the input flattened over its leading dims
    in_features: int
    out_features: int
    input_bytes: int
    weight_requires_grad: bool
    requested_ratio: float | None  # from the config; None: excluded by include/exclude
    dynamic_rows: bool = False  # N is symbolic: the graph serves every length, rows is its hint
    checkpointed: bool = False  # inside an activation-checkpointed region (recomputed in backward)

    @property
    def skip_reason(self) -> str | None:
        """Why this site is not a sampling candidate, or ``None`` if it is one."""
        if not self.weight_requires_grad:
            return "frozen weight: no activation saved for it"
        if self.checkpointed:
            return CHECKPOINTED_REASON
        if self.requested_ratio is None:
            return "excluded by include/exclude"
        if self.requested_ratio >= 1.0:
            return "keep ratio 1.0: exact"
        return None


@dataclass(frozen=True)
class InputGroup:
    """Candidate linears that read one saved input (q/k/v share one), and what sampling it does."""

    root: str  # joint-graph name of the input's storage
    weights: tuple[str, ...]
    input_bytes: Size
    verdict: str  # FREES, FREES_NOTHING or ADDS_MEMORY, before weighing the compact copies
    reason: str
    input_saved: bool = False  # the sampled partition still saves the whole input
    # What the sampled partition saves in the input's place, from it (a ReLU's mask, for the
    # ReLU's backward, once its output is no longer saved): sampling frees the input less this.
    kept_instead: Size | None = None

    @property
    def freed_input_bytes(self) -> Size:
        """The input's bytes less what is kept in its place."""
        return self.input_bytes if self.kept_instead is None else self.input_bytes - self.kept_instead


@dataclass(frozen=True)
class SavingsAnalysis:
    """What one captured graph's partitioned joint graph says about its candidate linears."""

    groups: tuple[InputGroup, ...]
    untraced: tuple[str, ...]  # candidate weights absent from the traced graph (dead code)
    memory: GraphMemory  # the dense partition's numbers, for the memory model (see under_recompute)
    # The dense partition's work, for the time model (under recompute with the sampled
    # partition's recompute in place of the dense one's).
    cost: GraphCost = GraphCost(0.0, 0.0)
    # Below partitioner budget 1, where sampling saves no more than the dense partition: ``memory``
    # is the sampled partition's (with the ``frees`` inputs' rows counted as whole inputs, so the
    # memory model can still choose their ratios), and the other groups are sampled as traced.
    under_recompute: bool = False
    # Where the sampled graph is compiled at a partitioner budget above the user's ``B``
    # (``WTAConfig.match_budget_bytes``): ``B``, whose dense partition's bytes it stays within.
    raised_from: float | None = None

    def traced_ratios(self, sites: Iterable[LinearSite]) -> dict[str, float]:
        """Weight → keep ratio of the groups sampled at the ratio the analysis traced them at
        (under recompute, every group the memory model does not choose for; at a raised
        budget, every group: that partition is the one checked against the user's bytes)."""
        if not self.under_recompute:
            return {}
        by_weight = {site.weight: site for site in sites}
        ratios = {}
        for group in self.groups:
            if group.verdict != FREES or self.raised_from is not None:
                ratio = max(by_weight[w].requested_ratio for w in group.weights)
                ratios.update((w, ratio) for w in group.weights)
        return ratios

    def sampleable_inputs(self, sites: Iterable[LinearSite], prefix: str = "") -> tuple[SampleableInput, ...]:
        """The memory model's view of the groups sampling frees, keyed ``prefix + root``."""
        by_weight = {site.weight: site for site in sites}
        return tuple(
            SampleableInput(prefix + group.root, group.freed_input_bytes, tuple(
                Reader(w, by_weight[w].rows, by_weight[w].in_features, by_weight[w].out_features,
                       by_weight[w].itemsize) for w in group.weights))
            for group in self.groups if group.verdict == FREES
        )


@dataclass(frozen=True)
class SiteDecision:
    """What became of one site."""

    sampled: bool
    keep_ratio: float | None  # the ratio it is sampled at (None when not sampled)
    verdict: str
    reason: str
    freed_bytes: int = 0  # predicted: its share of the input released minus its compact rows
    input_root: str | None = None  # joint-graph storage it reads (sites sharing one share it)
    # Sampled for speed where the input stays saved anyway: forward keeps only the indices, and
    # backward gathers the rows from the saved input (no compact copy).
    rows_in_backward: bool = False


def sampled_linear(readers: Sequence[LinearSite], gradient_aware: bool, rows: int | None = None) -> SampledLinear:
    """The time model's view of one sampled input and the linears reading it, at ``rows`` rows
    (default: as traced)."""
    first = readers[0]
    return SampledLinear(first.rows if rows is None else rows, first.in_features, first.itemsize,
                         tuple(r.out_features for r in readers), gradient_aware)
