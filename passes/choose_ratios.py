"""Decide each linear's keep ratio: the policy between the analysis and the rewrite.

Why a pass of its own: the analysis says *where* sampling frees memory, independent of the ratio;
how much to sample is a choice with three sources, and this is the one place that makes it:

* a fixed ratio — ``keep_ratio`` / ``keep_ratios`` (a :class:`~wtacompile.Plan` sets the latter);
* a budget — ``mem_gb``: the memory model (:mod:`wtacompile.memory_model`) and the solver
  (:mod:`wtacompile.solver`) pick a ratio per input so that predicted peak memory fits, at the
  least gradient variance, exact where it fits.

Linears reading one input share one sample, at the largest ratio asked of any of them. A group
is sampled where its verdict is ``frees`` and its compact copy weighs less than the input
(``freed = bytes(input) − compact``), and — with a fixed ratio only — where it is
``frees-nothing`` but its linears are wide enough (``Σ out ≥`` :data:`MIN_OUTPUTS_FOR_SPEED`) that
weight-gradient GEMMs on ``k`` of ``N`` rows save more time than the sampling costs. Under
``mem_gb`` only memory counts: a budget dense training fits stays exact.

Below partitioner budget 1 the analysis reads the sampled partition itself
(``analysis.under_recompute``): the ``frees`` groups are chosen as above, and every other group
is sampled at the ratio it was traced at, since that partition is the one the memory was read
from (and it saves no more than the dense one, or the analysis would have said ``adds-memory``).

Returns the state with ``decisions``: one :class:`~wtacompile.sites.SiteDecision` per site.
"""

from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType

import torch
import torch.fx as fx

from wtacompile.compiled_models import BudgetLedger, graph_key
from wtacompile.memory_model import INDEX_BYTES, MemoryModel, compact_bytes, format_bytes, parameter_bytes
from wtacompile.sites import ADDS_MEMORY, FREES, FREES_NOTHING, SKIPPED, InputGroup, LinearSite, SiteDecision
from wtacompile.solver import DEFAULT_MENU, solve
from .compile_state import CompileState

__all__ = ["MIN_OUTPUTS_FOR_SPEED", "BudgetNotMet", "choose_ratios"]

log = logging.getLogger("wtacompile")

class BudgetNotMet(ValueError):
    """``mem_gb`` cannot be met by this graph at its partitioner budget, even at the smallest ratio
    (the backend then tries a lower partitioner budget, :data:`wtacompile.solver.DEFAULT_BUDGET_MENU`,
    unless ``parameters_alone``: parameters, gradients and optimizer state exceed it by themselves,
    which no recompute changes)."""

    def __init__(self, message: str, parameters_alone: bool = False) -> None:
        super().__init__(message)
        self.parameters_alone = parameters_alone


#: Σ out_features of the linears sharing an input below which sampling it only for speed does not
#: pay: the draw (row norms, selection, gather) costs about as much as a GEMM this narrow saves.
MIN_OUTPUTS_FOR_SPEED = 64


def choose_ratios(gm: fx.GraphModule, state: CompileState) -> CompileState:
    """One decision per site: skipped, exact, or sampled at a ratio."""
    analysis = state.analysis
    sites = {site.weight: site for site in state.sites}
    decisions: dict[str, SiteDecision] = {}
    for site in state.sites:
        if site.skip_reason is not None:
            decisions[site.weight] = SiteDecision(False, None, SKIPPED, site.skip_reason)
    for weight in analysis.untraced:
        decisions[weight] = SiteDecision(False, None, FREES_NOTHING, "not in the traced graph")
    if state.config.mem_gb is None:
        ratios = {w: sites[w].requested_ratio for g in analysis.groups for w in g.weights}
    else:  # the solver decides the inputs sampling frees; the others stay exact
        ratios = _budget_ratios(state)
    as_traced = analysis.traced_ratios(state.sites)
    for group in analysis.groups:
        readers = [sites[w] for w in group.weights]
        if group.weights[0] in as_traced:
            decisions.update(_sampled_as_traced(group, readers, as_traced[group.weights[0]]))
        else:
            decisions.update(_decide_group(group, readers, ratios, state.config.min_rows))
    ordered = {site.weight: decisions[site.weight] for site in state.sites}
    return dataclasses.replace(state, decisions=MappingProxyType(ordered))


def _decide_group(group: InputGroup, sites: list[LinearSite], ratios: dict[str, float],
                  min_rows: int) -> dict[str, SiteDecision]:
    ratio = max(ratios[s.weight] for s in sites)  # one sample per input, at the largest ratio asked
    shared = f" (input shared by {len(sites)} linears)" if len(sites) > 1 else ""
    if ratio >= 1.0:
        reason = "exact: the memory budget is met without sampling it"
        return {s.weight: SiteDecision(False, None, SKIPPED, reason, input_root=group.root) for s in sites}
    first = sites[0]
    freed = group.freed_input_bytes.traced - compact_bytes(first.rows, first.in_features, first.itemsize,
                                                     ratio, min_rows)
    verdict, reason, sampled, gathered = group.verdict, group.reason, False, False
    if verdict == FREES:
        # Under dynamic shapes one graph serves every length: judge it where N is large (k ≈ rN),
        # by bytes per row — r·(D·itemsize + 8 index bytes) against D·itemsize.
        row_bytes = first.in_features * first.itemsize
        # Of each row, what sampling frees: all of it, less what is kept in its place (a mask).
        freeable = row_bytes * group.freed_input_bytes.traced / max(group.input_bytes.traced, 1)
        frees_when_long = first.dynamic_rows and ratio * (row_bytes + INDEX_BYTES) < freeable
        sampled = freed > 0 or frees_when_long
        if not sampled:
            verdict, reason = ADDS_MEMORY, "the compact rows would outweigh the input they replace"
        elif freed <= 0:
            reason += (f"; at the traced {first.rows} rows all are kept (min_rows); longer inputs, "
                       "which this dynamic graph also serves, free")
    elif verdict == FREES_NOTHING or (verdict == ADDS_MEMORY and group.input_saved):
        # Memory-neutral: worth it only where the weight-gradient GEMMs dwarf the sampling work.
        # Where the rows would add (the input stays saved for another op's backward), forward
        # keeps only the indices and backward gathers the rows from the saved input.
        sampled = sum(s.out_features for s in sites) >= MIN_OUTPUTS_FOR_SPEED
        if sampled and verdict == ADDS_MEMORY:
            gathered = True
            reason = (group.reason.split(";")[0] + "; sampled for cheaper weight gradients, its rows "
                      "gathered in backward from the saved input (forward keeps the indices only)")
        else:
            reason += ("; sampled for cheaper weight gradients" if sampled
                       else f"; too narrow to pay for sampling (< {MIN_OUTPUTS_FOR_SPEED} outputs)")
    return {
        s.weight: SiteDecision(sampled, ratio if sampled else None, verdict, reason + shared,
                               freed // len(sites) if sampled and verdict == FREES else 0, group.root,
                               rows_in_backward=gathered)
        for s in sites
    }


def _sampled_as_traced(group: InputGroup, sites: list[LinearSite], ratio: float) -> dict[str, SiteDecision]:
    """Below partitioner budget 1 (``analysis.under_recompute``): the sampled partition, which
    saves no more than the dense one, is what the memory model holds, so it is what is compiled."""
    shared = f" (input shared by {len(sites)} linears)" if len(sites) > 1 else ""
    reason = (f"{group.reason}; sampled as analysed: under recompute the sampled partition saves "
              f"no more than the dense one{shared}")
    return {s.weight: SiteDecision(True, ratio, group.verdict, reason, 0, group.root) for s in sites}


def _budget_ratios(state: CompileState) -> dict[str, float]:
    """``mem_gb``: this graph's ratio per weight (one per input root), under what the model's other graphs left of
    the budget (``state.budget``; without a ledger the graph has it all), by the planner's memory
    model and solver evaluated at the traced shapes."""
    config = state.config
    parameters = [t for t in state.example_inputs if isinstance(t, torch.nn.Parameter)]
    model = MemoryModel(
        *parameter_bytes(parameters, config.optimizer),
        graphs=(state.analysis.memory,),
        inputs=state.analysis.sampleable_inputs(state.sites),
        trace_batch=1,
        min_rows=config.min_rows,
    )
    ledger = state.budget if state.budget is not None else BudgetLedger()
    key = graph_key(state.example_inputs)
    committed = ledger.committed_by_others(key)
    budget = int(config.mem_gb * 1e9) - committed
    choices = model.choices_at(None, DEFAULT_MENU)
    solution = solve(choices, budget - model.fixed_at(None))
    if not (solution.feasible and model.step_peak() <= budget):
        needed = max(model.fixed_at(None) + solution.min_bytes, model.step_peak())
        recompute = ("" if config.activation_memory_budget is None else
                     f" and activation_memory_budget {config.activation_memory_budget:g}")
        raise BudgetNotMet(
            f"wtacrs: mem_gb={config.mem_gb:g} cannot be met: this graph needs about "
            f"{format_bytes(committed + needed)} even at keep ratio {min(DEFAULT_MENU)}{recompute}. "
            "Use a smaller batch, freeze layers or add LoRA, or raise mem_gb; "
            "wtacompile.plan(model, mem_gb) shows the breakdown.",
            parameters_alone=model.step_peak() > budget,
        )
    ratios = dict(solution.ratios)
    if any(site.dynamic_rows for site in state.sites):
        ratios = _no_larger_than_before(ratios, state, ledger.earlier_ratios(key))
    weights = {w: ratios.get(g.root, 1.0) for g in state.analysis.groups for w in g.weights}
    ledger.commit(key, model.peak(None, ratios), weights, config.activation_memory_budget)
    return weights


def _no_larger_than_before(ratios: dict[str, float], state: CompileState,
                           earlier: dict[str, float]) -> dict[str, float]:
    """A dynamic-shape recompile is solved at the length that triggered it — often a short last
    batch, where everything fits exact — yet serves every length after it. Keep each input's
    ratio no larger than the earlier compile of this graph chose at its (longer) length."""
    log.warning("wtacrs mem_gb under dynamic shapes: the budget is fitted at the traced lengths "
                "(and no ratio rises above an earlier compile's); inputs longer than any compiled "
                "may exceed it. For a hard bound plan at the longest length: "
                "options={'plan': wtacompile.plan(model, mem_gb, seq_len=...)}")
    bounded = dict(ratios)
    for group in state.analysis.groups:
        before = [earlier[w] for w in group.weights if w in earlier]
        if before:
            bounded[group.root] = min(bounded.get(group.root, 1.0), min(before))
    return bounded
