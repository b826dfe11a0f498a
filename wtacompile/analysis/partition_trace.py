"""Trace a dynamo graph through AOTAutograd the way the inner compiler will, keeping the split.

Why: whether sampling a linear frees memory depends on what the partitioner saves for backward
and what it recomputes — facts of the partitioned joint graph, not of the model code. The trace
uses the inner compiler's decompositions (Inductor's, unless ``inner="aot_eager"``/``"eager"``)
and the same pinned min-cut partitioner (:func:`wtacompile.lower.pinned_min_cut_partition`) under
the same partitioner budget (:func:`wtacompile.lower.partitioner_budget`) — below budget 1 after
Inductor's own joint-graph passes, as Inductor partitions — so it sees the saved set the real
compile will produce.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from wtacompile._compat import aot_trace, specialize_scalar_inputs, storage_root
from wtacompile.config import WTAConfig
from wtacompile.lower import (WIDENED_FROM, effective_partitioner_budget, partitioner_budget,
                              pinned_min_cut_partition, widens_masks)
from wtacompile.solver import largest_fitting

__all__ = ["PartitionTrace", "copy_module", "trace_largest_fitting", "trace_partition"]


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
    return trace_largest_fitting(gm, config, (), lambda _split: True, static=static)[0]


def trace_largest_fitting(gm: fx.GraphModule, config: WTAConfig, budgets: Sequence[float],
                          fits: Callable[[PartitionTrace], bool], *, static: bool = False
                          ) -> tuple[PartitionTrace, float | None]:
    """One AOTAutograd trace of ``gm``, its joint graph split at the largest partitioner budget
    of ``budgets`` for which ``fits(split)``; without one (or with no ``budgets``), the
    split at ``config``'s own budget. Returns the split and the budget it was made at (``None``:
    ``config``'s).

    What a split saves grows with the budget, so the budgets are bisected
    (:func:`wtacompile.solver.largest_fitting`: ``⌈log2(n + 1)⌉`` partitions for ``n`` budgets;
    an answer is always one that was checked to fit). Each budget partitions a copy of the joint
    graph (the partitioner rewrites the graph it is given, CSE first); the joint graph is traced
    once, which is most of the cost.
    """
    captured: list[tuple[PartitionTrace, float | None]] = []
    widen_masks = widens_masks(config)
    # Inductor rewrites the joint graph before it partitions; under a budget below 1 the knapsack
    # is sensitive to that (T5 at 0.5: the analysis missed four saved ReLU masks, 13% of the
    # bytes, without them). At budget 1 the min cut saves the same either way (the tests compare
    # predicted with measured bytes), and the passes would cost a plan ~6% of its time.
    joint_passes = config.inner == "inductor" and effective_partitioner_budget(config) < 1.0

    def split(joint, joint_inputs, kwargs) -> PartitionTrace:
        forward, backward = pinned_min_cut_partition(joint, joint_inputs, widen_masks=widen_masks, **kwargs)
        return PartitionTrace(joint, forward, backward, kwargs["num_fwd_outputs"])

    def recording_partition(joint, joint_inputs, **kwargs):
        if joint_passes:  # once: they do not depend on the budget
            joint = _inductor_joint_passes(joint, joint_inputs)

        def attempt(budget: float) -> PartitionTrace | None:
            with torch._functorch.config.patch(activation_memory_budget=budget):
                trial = split(copy_module(joint), joint_inputs, kwargs)
            return trial if fits(trial) else None

        found = largest_fitting(budgets, attempt)
        captured.append((found[1], found[0]) if found else (split(joint, joint_inputs, kwargs), None))
        return captured[-1][0].forward, captured[-1][0].backward

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
    return captured[-1]  # the outer graph's: higher-order ops' bodies are partitioned first


def _inductor_joint_passes(joint: fx.GraphModule, joint_inputs) -> fx.GraphModule:
    """The joint-graph passes Inductor runs before it partitions (its pattern rewrites change
    what the partitioner can save: a ReLU's mask, which it computes where)."""
    from torch._inductor.compile_fx import _recursive_joint_graph_passes, get_inputs_devices

    devices = get_inputs_devices(joint_inputs, joint)  # as Inductor's partition_fn passes it
    return _recursive_joint_graph_passes(joint, skip_invoke_subgraph=True, input_device=next(iter(devices), None))


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` to trace or rewrite freely: same node names, and the module meta
    AOTAutograd reads (which inputs are parameters: the partitioner treats those as free)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy
