"""Trace a dynamo graph through AOTAutograd the way the inner compiler will, keeping the split.

Why: whether sampling a linear frees memory depends on what the partitioner saves for backward
and what it recomputes — facts of the partitioned joint graph, not of the model code. The trace
uses the inner compiler's decompositions (Inductor's, unless ``inner="aot_eager"``/``"eager"``)
and the same pinned min-cut partitioner (:func:`wtacompile.lower.pinned_min_cut_partition`) under
the same partitioner budget (:func:`wtacompile.lower.partitioner_budget`), so it sees the saved set
the real compile will produce.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx as fx

from wtacompile._compat import aot_trace, specialize_scalar_inputs, storage_root
from wtacompile.config import WTAConfig
from wtacompile.lower import WIDENED_FROM, partitioner_budget, pinned_min_cut_partition, widens_masks

__all__ = ["PartitionTrace", "copy_module", "trace_partition"]


@dataclass
class PartitionTrace:
    """The joint graph and the partitioner's split of it."""

    joint: fx.GraphModule
    forward: fx.GraphModule
    backward: fx.GraphModule
    num_fwd_outputs: int

    @functools.cached_property
    def saved_roots(self) -> set[str]:
        """Joint-graph names of the storages the forward saves for backward."""
        out = self.forward.graph.find_nodes(op="output")[0]
        saved = out.args[0][self.num_fwd_outputs:]
        return {n.meta.get(WIDENED_FROM) or storage_root(n).name for n in saved
                if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)}

    @functools.cached_property
    def recomputed(self) -> set[str]:
        """Forward nodes the backward graph recomputes (copied under their joint names)."""
        return {n.name for n in self.backward.graph.nodes if n.op == "call_function"}

    @functools.cached_property
    def joint_nodes(self) -> dict[str, fx.Node]:
        return {n.name: n for n in self.joint.graph.nodes}


def trace_partition(gm: fx.GraphModule, config: WTAConfig, *, static: bool = False) -> PartitionTrace:
    """Trace ``gm`` (left unchanged) through AOTAutograd and return the partitioner's split;
    ``static=True``: at the traced sizes even if ``gm`` is symbolic (see :func:`aot_trace`)."""
    captured: list[PartitionTrace] = []

    widen_masks = widens_masks(config)

    def recording_partition(joint, joint_inputs, **kwargs):
        forward, backward = pinned_min_cut_partition(joint, joint_inputs, widen_masks=widen_masks, **kwargs)
        captured.append(PartitionTrace(joint, forward, backward, kwargs["num_fwd_outputs"]))
        return forward, backward

    decompositions = None
    if config.inner == "inductor":
        from torch._inductor.decomposition import select_decomp_table

        decompositions = select_decomp_table()
    traced = copy_module(gm)
    specialize_scalar_inputs(traced)
    with partitioner_budget(config):
        aot_trace(traced, recording_partition, decompositions, static=static)
    if not captured:
        raise RuntimeError("wtacrs analysis: AOTAutograd produced no joint graph to partition")
    return captured[0]


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` to trace or rewrite freely: same node names, and the module meta
    AOTAutograd reads (which inputs are parameters: the partitioner treats those as free)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy
