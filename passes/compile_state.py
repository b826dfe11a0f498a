"""The value every pass takes and returns: the config, and what earlier passes established.

Each pass is ``(gm, state) -> state``: it reads what it needs, returns a new state with its own
result filled in (``dataclasses.replace``), and never changes an earlier pass's result. Only
:func:`~wtacompile.passes.rewrite_sampled` changes ``gm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch.fx as fx

from wtacompile.compiled_models import BudgetLedger
from wtacompile.config import WTAConfig
from wtacompile.sites import LinearSite, SavingsAnalysis, SiteDecision

__all__ = ["CompileState", "GraphPass"]


@dataclass(frozen=True)
class CompileState:
    """What is known about one captured graph, pass by pass."""

    config: WTAConfig
    example_inputs: tuple[Any, ...] = ()  # dynamo's, parameters included
    sites: tuple[LinearSite, ...] = ()  # find_linears
    analysis: SavingsAnalysis | None = None  # analyze_savings
    decisions: Mapping[str, SiteDecision] = field(default_factory=lambda: MappingProxyType({}))  # choose_ratios
    parameter_names: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))  # id → model's name
    # A tied parameter's other names, by its first (GPT-2's head: lm_head.weight for transformer.wte.weight)
    parameter_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    budget: BudgetLedger | None = None  # the model's mem_gb ledger (the backend's, per model)

    @property
    def ratios(self) -> dict[str, float]:
        """``{weight: keep ratio}`` of the sites to sample."""
        return {w: d.keep_ratio for w, d in self.decisions.items() if d.sampled}

    @property
    def rows_in_backward(self) -> frozenset[str]:
        """The sampled weights whose rows backward gathers from their saved input."""
        return frozenset(w for w, d in self.decisions.items() if d.sampled and d.rows_in_backward)


class GraphPass(Protocol):
    def __call__(self, gm: fx.GraphModule, state: CompileState) -> CompileState: ...
