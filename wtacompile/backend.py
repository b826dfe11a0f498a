"""The ``wtacrs`` torch.compile backend.

``torch.compile(model, backend="wtacrs", options={...})`` — registered through the
``torch_dynamo_backends`` entry point, so no import is needed. For each graph dynamo captures it
runs :data:`wtacompile.passes.PIPELINE`::

    find_linears → analyze_savings → choose_ratios → rewrite_sampled → inner compiler

Inference graphs (grad disabled, or nothing in the graph requires grad) skip the passes entirely
and go straight to the inner compiler (:mod:`wtacompile.lower`): zero overhead. Every decision is
recorded (:func:`wtacompile.last_compile_report`).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.fx as fx

from wtacompile._compat import graph_root_module, parameter_names
from wtacompile.compiled_models import align_settings, ledger_for, owning_model
from wtacompile.config import WTAConfig
from wtacompile.lower import compile_graph
from wtacompile.passes import CompileState, run_passes
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
    graph_id = next(_graph_ids)
    if training:
        root = graph_root_module(gm)
        model = owning_model(root)
        if model is not None:
            config = align_settings(config, model)
        budget = ledger_for(model, config.fingerprint()) if config.mem_gb is not None else None
        names = MappingProxyType(parameter_names(model) if model is not None else {})
        state = run_passes(gm, CompileState(config, tuple(example_inputs), budget=budget,
                                            parameter_names=names))
        _warn_checkpointed(state.sites)
        report = GraphReport.build(graph_id, config.fingerprint(), True, state.sites, state.decisions)
        log.info("%s", report)
    else:
        report = GraphReport.build(graph_id, config.fingerprint(), False)
    if config.report:
        record(report)
    return compile_graph(gm, example_inputs, config, mode)


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

