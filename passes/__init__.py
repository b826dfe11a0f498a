"""Graph passes of the ``wtacrs`` backend (installed as ``wtacompile.passes``).

Every pass is ``(gm, state) -> state`` (:class:`CompileState`), and they run in this order:

1. :func:`find_linears` — capture: the linear-like nodes and their weights, as frozen facts.
2. :func:`analyze_savings` — analyze: which inputs sampling really frees, from the partitioned
   joint graph (names and bytes).
3. :func:`choose_ratios` — decide: a keep ratio per linear (fixed, from a plan, or solved under
   ``mem_gb``).
4. :func:`rewrite_sampled` — rewrite: the chosen linears become the sampled-save op.

Lowering (the inner compiler, and the joint-graph hook that keeps the random choice saved) is
:mod:`wtacompile.lower`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from .analyze_savings import analyze_savings
from .choose_ratios import BudgetNotMet, choose_ratios
from .compile_state import CompileState, GraphPass
from .find_linears import find_linears
from .rewrite_sampled import Rewritten, rewrite_sampled, rewrite_sites

__all__ = [
    "ANALYSIS_PASSES",
    "BudgetNotMet",
    "PIPELINE",
    "CompileState",
    "Rewritten",
    "GraphPass",
    "analyze_savings",
    "choose_ratios",
    "find_linears",
    "rewrite_sampled",
    "rewrite_sites",
    "run_passes",
]

#: What the planner runs: facts and analysis, no decision, no rewrite.
ANALYSIS_PASSES: tuple[GraphPass, ...] = (find_linears, analyze_savings)
#: What the backend runs on every training graph, in this order (the first three once per partitioner
#: budget it tries under ``mem_gb``: :func:`wtacompile.backend.partitioner_menu`).
PIPELINE: tuple[GraphPass, ...] = (*ANALYSIS_PASSES, choose_ratios, rewrite_sampled)


def run_passes(gm: fx.GraphModule, state: CompileState,
               passes: Sequence[GraphPass] = PIPELINE) -> CompileState:
    """Run ``passes`` in order, each on the state the previous one returned."""
    for graph_pass in passes:
        state = graph_pass(gm, state)
    return state
