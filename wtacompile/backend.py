"""The ``wtacrs`` torch.compile backend.

``torch.compile(model, backend="wtacrs", options={...})`` — registered through the
``torch_dynamo_backends`` entry point, so no import is needed. For each graph dynamo captures it
runs :data:`wtacompile.passes.PIPELINE`::

    find_linears → analyze_savings → choose_ratios → rewrite_sampled → inner compiler

(the analysis passes and ``choose_ratios`` run here, so that under ``mem_gb`` they can run again
at another partitioner budget). Under ``mem_gb`` the partitioner budget is chosen with the keep
ratios: the analysis and the choice run at the budgets of
:data:`wtacompile.solver.DEFAULT_BUDGET_MENU`, from the top, to find the largest at which the
predicted peak fits — the least recompute that fits (recompute is what costs time; sampling saves
some; where that budget stays dense, the next lower one is taken if it samples and is predicted
faster), and at it the least-variance ratios. A budget dense training fits stays exact, at
partitioner budget 1. A partitioner budget the user set (the option, or torch's global
``activation_memory_budget``) is not searched; a sampled graph is compiled at it, or at a larger
one where that saves no more than the dense partition at it (``match_budget_bytes``,
:mod:`wtacompile.passes.analyze_savings`).

Inference graphs (grad disabled, or nothing in the graph requires grad) skip the passes entirely
and go straight to the inner compiler (:mod:`wtacompile.lower`): zero overhead. Every decision is
recorded (:func:`wtacompile.last_compile_report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.fx as fx

from wtacompile._compat import graph_root_module, parameter_aliases, parameter_names
from wtacompile.analysis.partition_trace import reusing_joint_graphs
from wtacompile.compiled_models import align_settings, graph_key, ledger_for, owning_model
from wtacompile.config import WTAConfig
from wtacompile.estimator import num_kept_rows
from wtacompile.lower import compile_graph
from wtacompile.passes import ANALYSIS_PASSES, BudgetNotMet, CompileState, choose_ratios, rewrite_sampled, run_passes
from wtacompile.report import GraphReport, record
from wtacompile.sites import sampled_linear
from wtacompile.solver import DEFAULT_BUDGET_MENU, fastest_fitting
from wtacompile.time_model import SampledLinear, balance_for, step_time_ratio

__all__ = ["partitioner_menu", "wtacrs_backend"]

log = logging.getLogger("wtacompile")
_graph_ids = itertools.count()


def wtacrs_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: Mapping[str, Any] | WTAConfig | None = None,
) -> Callable:
    """Dynamo backend: sample the saved inputs of linears where that frees memory, then compile.

    Args:
        gm: the graph dynamo captured.
        example_inputs: its example inputs (parameters included, as dynamo lifts them).
        mode: ``torch.compile``'s mode, handed on to Inductor (``"max-autotune"``, ...).
        options: see :class:`wtacompile.WTAConfig`; unknown keys raise ``ValueError``.
    """
    config = WTAConfig.from_options(options)
    training = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    )
    graph_id = next(_graph_ids)
    if training:
        root = graph_root_module(gm)
        model = owning_model(root)
        if model is not None:
            config = align_settings(config, model)
        budget = ledger_for(model, config.fingerprint()) if config.mem_gb is not None else None
        names = MappingProxyType(parameter_names(model) if model is not None else {})
        aliases = MappingProxyType(parameter_aliases(model) if model is not None else {})
        state = CompileState(config, tuple(example_inputs), budget=budget, parameter_names=names,
                             parameter_aliases=aliases)
        state, step_time = _analyse_and_decide(gm, state, example_inputs)
        state = rewrite_sampled(gm, state)
        _warn_checkpointed(state.sites)
        report = GraphReport.build(graph_id, config.fingerprint(), True, state.sites, state.decisions,
                                   state.config.activation_memory_budget, step_time,
                                   state.analysis.raised_from)
        log.info("%s", report)
        config = state.config  # with the partitioner budget chosen
    else:
        report = GraphReport.build(graph_id, config.fingerprint(), False)
    if config.report:
        record(report)
    return compile_graph(gm, example_inputs, config, mode)


def partitioner_menu(config: WTAConfig) -> tuple[float | None, ...]:
    """The partitioner budgets to try, in order (``None``: torch's global setting).

    A budget given in the options (or by a plan) is the one analysed; so is torch's global
    ``activation_memory_budget`` when the user has set it below 1 (the analysis may then compile
    a sampled graph at a larger one that saves no more: ``match_budget_bytes``). Only ``mem_gb``
    searches this menu.
    """
    if config.activation_memory_budget is not None:
        return (config.activation_memory_budget,)
    if (config.mem_gb is None or config.inner == "eager"  # eager: no partitioner to budget
            or torch._functorch.config.activation_memory_budget != 1.0):
        return (None,)
    return DEFAULT_BUDGET_MENU


def _analyse_and_decide(gm: fx.GraphModule, state: CompileState, example_inputs
                        ) -> tuple[CompileState, float]:
    """The analysis passes and :func:`choose_ratios` at the largest budget of
    :func:`partitioner_menu` where the decision fits (only ``mem_gb`` can miss; its first budget
    is tried first, then the rest from the top; where the answer stays dense, the next lower
    budget that fits is taken instead if it samples and is predicted faster:
    :func:`wtacompile.solver.fastest_fitting`), and the
    decision's predicted step time relative to this graph's dense training at the first budget."""
    menu = partitioner_menu(state.config)
    if state.budget is not None and len(menu) > 1:
        # A recompile (a new length under dynamic shapes) recomputes no less than the compile
        # before it chose: like its ratios, its budget was fitted at a longer length.
        earlier = state.budget.earlier_partitioner_budget(graph_key(example_inputs))
        if earlier is not None:
            menu = tuple(b for b in menu if b <= earlier) or (earlier,)
    reference = None  # the first budget's analysis: what the step time is relative to
    failures: list[BudgetNotMet] = []
    ledger, key = state.budget, graph_key(example_inputs)
    before = ledger.entry(key) if ledger is not None else None
    commits: dict[float | None, Any] = {}  # each success's ledger entry for this graph

    def attempt(budget: float | None) -> CompileState | None:
        nonlocal reference
        if ledger is not None:  # every attempt solves against what the ledger held before any
            ledger.restore(key, before)
        trial = state if budget is None else dataclasses.replace(
            state, config=dataclasses.replace(state.config, activation_memory_budget=budget))
        analysed = run_passes(gm, trial, ANALYSIS_PASSES)
        reference = reference or analysed.analysis
        try:
            decided = choose_ratios(gm, analysed)
        except BudgetNotMet as error:
            if error.parameters_alone:
                raise  # no recompute shrinks parameters, gradients and optimizer state
            log.info("wtacrs mem_gb: does not fit at activation_memory_budget %s", budget)
            failures.append(error)
            return None
        commits[budget] = ledger.entry(key) if ledger is not None else None
        return decided

    def step_time(decided: CompileState) -> float:
        return step_time_ratio((decided.analysis.cost,), _sampled_linears(decided), (reference.cost,),
                               balance_for(_device_type(example_inputs)))

    # Where several budgets may be tried, each splits the joint graphs traced once.
    with reusing_joint_graphs() if len(menu) > 1 else contextlib.nullcontext():
        budget, decided = menu[0], attempt(menu[0])
        if decided is None and len(menu) > 1:
            budget, decided = fastest_fitting(menu[1:], attempt, lambda d: bool(_sampled_linears(d)),
                                              step_time) or (None, None)
    if decided is None:
        raise failures[-1]  # the last attempt was at the smallest budget: the least recompute
    if ledger is not None:
        ledger.restore(key, commits[budget])  # the answer's commit, not a later attempt's
    return decided, step_time(decided)


def _sampled_linears(state: CompileState) -> list[tuple[SampledLinear, int]]:
    """Each sampled input as the time model sees it, with the rows it keeps."""
    sites = {s.weight: s for s in state.sites}
    sampled = []
    for group in state.analysis.groups:
        decision = state.decisions[group.weights[0]]
        if decision.sampled:
            linear = sampled_linear([sites[w] for w in group.weights], state.config.row_scores == "gradient")
            sampled.append((linear, num_kept_rows(linear.rows, decision.keep_ratio, state.config.min_rows)))
    return sampled


def _device_type(example_inputs) -> str:
    return next((t.device.type for t in example_inputs if isinstance(t, torch.Tensor)), "cpu")


def _warn_checkpointed(sites) -> None:
    checkpointed = [s.weight for s in sites if s.checkpointed and s.weight_requires_grad]
    if checkpointed:
        warnings.warn(
            f"wtacrs: {len(checkpointed)} linear(s) run inside activation-checkpointed regions "
            f"(e.g. {checkpointed[0]}) and stay exact: their inputs are recomputed, not saved, so "
            "sampling them frees nothing. Turn off gradient checkpointing "
            "(model.gradient_checkpointing_disable()) to let wtacrs sample them; "
            "wtacompile.last_compile_report() lists them.",
            stacklevel=2,
        )

