"""The ``wtacrs`` torch.compile backend.

``torch.compile(model, backend="wtacrs", options={...})`` — registered through the
``torch_dynamo_backends`` entry point, so no import is needed. For each graph dynamo captures:

    find_linears → analyze_savings → rewrite_sampled → inner compiler (Inductor by default)

Inference graphs (grad disabled, or nothing in the graph requires grad) skip the passes entirely
and go straight to the inner compiler: zero overhead. Every decision is recorded
(:func:`wtacompile.last_compile_report`).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from wtacompile.config import WTAConfig
from wtacompile.passes import META_KEY, analyze_savings, find_linears, rewrite_sampled
from wtacompile.report import GraphReport, record

__all__ = ["wtacrs_backend"]

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
    report = GraphReport(
        graph_id=next(_graph_ids), config_fingerprint=config.fingerprint(), training=training
    )
    if training:
        gm = find_linears(gm, config)
        if config.mem_gb is not None:
            gm = _plan_for_budget(gm, example_inputs, config)
        else:
            gm = analyze_savings(gm, config)
        gm = rewrite_sampled(gm, config)
        report.sites = [n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta]
        log.info("%s", report)
    if config.report:
        record(report)
    return _inner_compiler(config, mode)(gm, example_inputs)


# Bytes each graph compiled under a mem_gb budget commits, per config fingerprint and keyed by
# the graph's parameters (a recompile of the same graph replaces its entry rather than adding):
# one budget across all graphs of a model.
_COMMITTED: dict[str, dict[frozenset, int]] = {}


def _plan_for_budget(gm: fx.GraphModule, example_inputs, config: WTAConfig) -> fx.GraphModule:
    """``options={"mem_gb": ...}``: choose this graph's keep ratios with the budget left over by
    the graphs compiled before it (the planner's memory model and solver, per graph)."""
    from wtacompile.passes import apply_verdicts, classify_sites
    from wtacompile.planner import plan_graph_ratios
    from wtacompile.solver import DEFAULT_MENU

    graphs = _COMMITTED.setdefault(config.fingerprint(), {})
    parameters = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
    key = frozenset(id(p) for p in parameters)
    committed = sum(nbytes for other, nbytes in graphs.items() if other != key)
    analysis = classify_sites(gm, config)
    budget = int(config.mem_gb * 1e9) - committed
    ratios, needed, feasible = plan_graph_ratios(
        analysis, parameters, budget_bytes=budget, optimizer=config.optimizer,
        menu=DEFAULT_MENU, min_rows=config.min_rows,
    )
    if not feasible:
        raise ValueError(
            f"wtacrs: mem_gb={config.mem_gb:g} cannot be met: this graph needs about "
            f"{(committed + needed) / 1e9:.2f} GB even at keep ratio {min(DEFAULT_MENU)}. "
            "Use a smaller batch, freeze layers or add LoRA, or raise mem_gb; "
            "wtacompile.plan(model, mem_gb) shows the breakdown."
        )
    for group in analysis.groups:
        for site in group.sites:
            site.keep_ratio = ratios.get(site.weight, 1.0)
    apply_verdicts(analysis, config.min_rows)
    graphs[key] = needed
    return gm


def _inner_compiler(config: WTAConfig, mode: str | None) -> Callable:
    if config.inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        from wtacompile.passes import PinSampledChoices

        patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
        patches["joint_custom_pre_pass"] = PinSampledChoices(torch._inductor.config.joint_custom_pre_pass)
        return functools.partial(compile_fx, config_patches=patches)
    if config.inner == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop

        from wtacompile.passes import pinned_min_cut_partition

        # The partitioner Inductor uses, so the saved set matches what the analysis traced.
        return aot_autograd(
            fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=pinned_min_cut_partition
        )
    return lambda gm, _inputs: gm.forward
