"""What the backend decided, per linear, per compiled graph: read by tests, people and benchmarks.

A :class:`GraphReport` is built once, at the end of the passes, from their values (the sites'
facts and the decisions) and never changes afterwards.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wtacompile.sites import LinearSite, SiteDecision

__all__ = ["GraphReport", "SiteReport", "clear_reports", "compile_reports", "last_compile_report"]


@dataclass(frozen=True)
class SiteReport:
    """One linear-like node of a captured graph and what became of it."""

    weight: str  # parameter FQN of the weight, e.g. "encoder.layer.0.attention.self.query.weight"
    node: str  # node name in the dynamo graph
    op: str  # "linear", "addmm", "mm" or "matmul"
    input_shape: tuple[int, ...]
    dtype: str
    in_features: int
    out_features: int
    input_bytes: int
    sampled: bool
    keep_ratio: float | None  # the ratio it is sampled at (None: not sampled)
    verdict: str  # "frees", "frees-nothing", "adds-memory" or "skipped"
    reason: str
    freed_bytes: int  # predicted: input bytes released minus the compact rows kept
    input_root: str | None  # joint-graph storage of its input (shared by q/k/v)
    dynamic_rows: bool = False  # the graph serves every length; input_shape is the traced one

    @classmethod
    def of(cls, site: LinearSite, decision: SiteDecision) -> SiteReport:
        return cls(site.weight, site.node, site.op, site.input_shape, site.dtype, site.in_features,
                   site.out_features, site.input_bytes, decision.sampled, decision.keep_ratio,
                   decision.verdict, decision.reason, decision.freed_bytes, decision.input_root,
                   site.dynamic_rows)


@dataclass(frozen=True)
class GraphReport:
    """All sites of one compiled graph."""

    graph_id: int
    config_fingerprint: str
    training: bool
    sites: tuple[SiteReport, ...] = ()
    # The partitioner budget the graph was compiled under (None: torch's global setting), and the
    # predicted step time relative to its dense training at the first budget tried
    # (wtacompile.time_model; 1 under a mem_gb search, else the one it was compiled under).
    activation_memory_budget: float | None = None
    predicted_step_time: float | None = None
    # The user's budget where the sampled graph was compiled at a larger one that saves no more
    # than the dense partition at it (WTAConfig.match_budget_bytes).
    raised_from: float | None = None

    @classmethod
    def build(cls, graph_id: int, config_fingerprint: str, training: bool,
              sites: Sequence[LinearSite] = (), decisions: Mapping[str, SiteDecision] = {},
              activation_memory_budget: float | None = None,
              predicted_step_time: float | None = None, raised_from: float | None = None) -> GraphReport:
        rows = tuple(SiteReport.of(site, decisions[site.weight]) for site in sites)
        return cls(graph_id, config_fingerprint, training, rows, activation_memory_budget,
                   predicted_step_time, raised_from)

    @property
    def sampled_sites(self) -> list[SiteReport]:
        return [s for s in self.sites if s.sampled]

    @property
    def predicted_freed_bytes(self) -> int:
        return sum(s.freed_bytes for s in self.sites if s.sampled)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A fixed-width table, one row per site."""
        header = f"{'weight':<52} {'input':>16} {'MiB':>8} {'ratio':>6} {'verdict':<14} reason"
        rows = [header, "-" * len(header)]
        for s in self.sites:
            ratio = "" if not s.sampled else f"{s.keep_ratio:.2f}"
            shape = "x".join(map(str, s.input_shape))
            rows.append(
                f"{s.weight[-52:]:<52} {shape:>16} {s.input_bytes / 2**20:>8.2f} {ratio:>6} "
                f"{s.verdict:<14} {s.reason}"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        extra = ""
        if self.activation_memory_budget is not None:
            extra += f", activation_memory_budget {self.activation_memory_budget:g}"
            if self.raised_from is not None:
                extra += f" (raised from {self.raised_from:g}: saves no more than its dense partition)"
        if self.predicted_step_time is not None:
            extra += f", predicted step time {self.predicted_step_time:.2f}x dense"
        if not self.sites:
            # Typically the tail of a model split by a graph break (GPT-2's logger call): the
            # linears are in an earlier graph's report.
            return (f"wtacrs graph {self.graph_id}: no linear layers in this graph{extra}; a graph break "
                    "splits a model into several graphs, each reported: wtacompile.compile_reports()")
        return (
            f"wtacrs graph {self.graph_id}: {len(self.sampled_sites)}/{len(self.sites)} linears "
            f"sampled, ~{self.predicted_freed_bytes / 2**20:.2f} MiB freed{extra}\n{self.table()}"
        )


_REPORTS: collections.deque[GraphReport] = collections.deque(maxlen=1024)  # bounded: recompiles


def record(report: GraphReport) -> None:
    _REPORTS.append(report)


def last_compile_report() -> GraphReport | None:
    """The report of the most recently compiled graph (``None`` before any compile)."""
    return _REPORTS[-1] if _REPORTS else None


def compile_reports() -> list[GraphReport]:
    """Reports of every graph compiled by the backend in this process, oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()
