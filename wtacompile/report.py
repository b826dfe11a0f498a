"""What the backend decided, per linear, per compiled graph: read by tests, people and the planner."""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

__all__ = ["LinearSite", "GraphReport", "last_compile_report", "compile_reports", "clear_reports"]

# Verdicts of the analysis pass.
FREES = "frees"  # nothing else keeps the input for backward: sampling frees its bytes
FREES_NOTHING = "frees-nothing"  # dense training would not keep the input either
ADDS_MEMORY = "adds-memory"  # another backward keeps the full input: sampling would only add
SKIPPED = "skipped"  # not eligible (frozen weight, excluded by pattern, ratio 1.0)


@dataclass
class LinearSite:
    """One linear-like node of a captured graph and what became of it."""

    node: str  # node name in the dynamo graph
    weight: str  # parameter FQN of the weight, e.g. "encoder.layer.0.attention.self.query.weight"
    op: str  # "linear", "addmm", "mm" or "matmul"
    input_shape: tuple[int, ...]
    dtype: str
    rows: int  # N: rows of the input flattened over its leading dims
    in_features: int
    out_features: int
    input_bytes: int
    weight_requires_grad: bool
    keep_ratio: float | None = None  # requested ratio (None: excluded by include/exclude)
    input_root: str | None = None  # joint-graph tensor whose storage the input is a view of
    verdict: str = SKIPPED
    reason: str = ""
    freed_bytes: int = 0  # predicted: input bytes released minus the compact rows kept
    sampled: bool = False


@dataclass
class GraphReport:
    """All sites of one compiled graph, plus the partitioner's saved bytes before and after."""

    graph_id: int
    config_fingerprint: str
    training: bool
    sites: list[LinearSite] = field(default_factory=list)
    saved_bytes_sampled_trace: int | None = None  # analysis trace with every eligible site sampled
    notes: list[str] = field(default_factory=list)

    @property
    def sampled_sites(self) -> list[LinearSite]:
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
        return (
            f"wtacrs graph {self.graph_id}: {len(self.sampled_sites)}/{len(self.sites)} linears "
            f"sampled, ~{self.predicted_freed_bytes / 2**20:.2f} MiB freed\n{self.table()}"
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
