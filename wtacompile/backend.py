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
        for graph_pass in (find_linears, analyze_savings, rewrite_sampled):
            gm = graph_pass(gm, config)
        report.sites = [n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta]
        log.info("%s", report)
    if config.report:
        record(report)
    return _inner_compiler(config, mode)(gm, example_inputs)


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
