"""Decide each linear's keep ratio: the policy between the analysis and the rewrite.

Why a pass of its own: the analysis says *where* sampling frees memory, independent of the ratio;
how much to sample is a choice with three sources, and this is the one place that makes it:

* a fixed ratio — ``keep_ratio`` / ``keep_ratios`` (a :class:`~wtacompile.Plan` sets the latter);
* a budget — ``mem_gb``: the memory model (:mod:`wtacompile.memory_model`) and the solver
  (:mod:`wtacompile.solver`) pick a ratio per input so that predicted peak memory fits, at the
  least gradient variance, exact where it fits.

Either way a site is sampled only if its group's verdict is ``frees`` and the compact copies of
every linear reading the input weigh less than the input: ``freed = bytes(input) − Σ compact``.

Returns the state with ``decisions``: one :class:`~wtacompile.sites.SiteDecision` per site.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import torch

from wtacompile.memory_model import MemoryModel, compact_bytes, parameter_bytes
from wtacompile.sites import ADDS_MEMORY, FREES, FREES_NOTHING, SKIPPED, InputGroup, LinearSite, SiteDecision
from wtacompile.solver import DEFAULT_MENU, solve
from .compile_state import CompileState

__all__ = ["choose_ratios"]

# Bytes each graph compiled under a mem_gb budget commits, per config fingerprint and keyed by
# the graph's parameters (a recompile of the same graph replaces its entry rather than adding):
# one budget across all graphs of a model.
_COMMITTED: dict[str, dict[frozenset, int]] = {}


def choose_ratios(gm, state: CompileState) -> CompileState:
    """One decision per site: skipped, exact, or sampled at a ratio."""
    analysis = state.analysis
    sites = {site.weight: site for site in state.sites}
    decisions: dict[str, SiteDecision] = {}
    for site in state.sites:
        if site.skip_reason is not None:
            decisions[site.weight] = SiteDecision(False, None, SKIPPED, site.skip_reason)
    for weight in analysis.untraced:
        decisions[weight] = SiteDecision(False, None, FREES_NOTHING, "not in the traced graph")
    group_ratio = _budget_ratios(state) if state.config.mem_gb is not None else {}
    ratios = {w: sites[w].requested_ratio for g in analysis.groups for w in g.weights}
    if state.config.mem_gb is not None:
        # The solver decides the inputs sampling frees; the others keep their verdicts.
        ratios.update({w: group_ratio.get(g.root, 1.0) for g in analysis.groups if g.verdict == FREES
                       for w in g.weights})
    for group in analysis.groups:
        decisions.update(_decide_group(group, [sites[w] for w in group.weights], ratios,
                                       state.config.min_rows))
    ordered = {site.weight: decisions[site.weight] for site in state.sites}
    return dataclasses.replace(state, decisions=MappingProxyType(ordered))


def _decide_group(group: InputGroup, sites: list[LinearSite], ratios: dict[str, float],
                  min_rows: int) -> dict[str, SiteDecision]:
    if all(ratios[s.weight] >= 1.0 for s in sites):
        reason = "exact: the memory budget is met without sampling it"
        return {s.weight: SiteDecision(False, None, SKIPPED, reason, input_root=group.root) for s in sites}
    compact = sum(compact_bytes(s.rows, s.in_features, s.itemsize, ratios[s.weight], min_rows)
                  for s in sites)
    freed = group.input_bytes.traced - compact
    verdict, reason = group.verdict, group.reason
    if verdict == FREES and freed <= 0:
        verdict, reason = ADDS_MEMORY, f"{len(sites)} compact copies outweigh the input they replace"
    if len(sites) > 1:
        reason += f" (input shared by {len(sites)} linears)"
    sampled = verdict == FREES
    return {
        s.weight: SiteDecision(sampled, ratios[s.weight] if sampled else None, verdict, reason,
                               freed // len(sites) if sampled else 0, group.root)
        for s in sites
    }


def _budget_ratios(state: CompileState) -> dict[str, float]:
    """``mem_gb``: this graph's ratio per input root, under the budget the graphs compiled before
    it left (the planner's memory model and solver, evaluated at the traced shapes)."""
    config = state.config
    parameters = [t for t in state.example_inputs if isinstance(t, torch.nn.Parameter)]
    model = MemoryModel(
        *parameter_bytes(parameters, config.optimizer),
        graphs=(state.analysis.memory,),
        inputs=state.analysis.sampleable_inputs(state.sites),
        trace_batch=1,
        min_rows=config.min_rows,
    )
    graphs = _COMMITTED.setdefault(config.fingerprint(), {})
    key = frozenset(id(p) for p in parameters)
    committed = sum(nbytes for other, nbytes in graphs.items() if other != key)
    budget = int(config.mem_gb * 1e9) - committed
    choices = model.choices_at(None, DEFAULT_MENU)
    solution = solve(choices, budget - model.fixed_at(None))
    if not (solution.feasible and model.step_peak() <= budget):
        needed = max(model.fixed_at(None) + solution.min_bytes, model.step_peak())
        raise ValueError(
            f"wtacrs: mem_gb={config.mem_gb:g} cannot be met: this graph needs about "
            f"{(committed + needed) / 1e9:.2f} GB even at keep ratio {min(DEFAULT_MENU)}. "
            "Use a smaller batch, freeze layers or add LoRA, or raise mem_gb; "
            "wtacompile.plan(model, mem_gb) shows the breakdown."
        )
    graphs[key] = model.peak(None, solution.ratios)
    return solution.ratios
