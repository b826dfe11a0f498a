"""Count a partitioned graph's work for the step-time model (:mod:`wtacompile.time_model`).

FLOPs come from torch's own formulas (:data:`torch.utils.flop_counter.flop_registry`, the ones
the partitioner's ``activation_memory_budget`` knapsack estimates runtime with), evaluated on the
nodes' fake values at their traced sizes; the CPU attention kernels, which that registry lacks,
get the same count as the flash kernels. Every other op that makes a tensor of its own (views
make none) counts its output bytes.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from wtacompile._compat import is_storage_view, size_hint
from wtacompile.time_model import GraphCost
from .graph_numbers import module_path, owning_module
from .partition_trace import PartitionTrace

__all__ = ["graph_cost", "node_flops", "recompute_cost", "with_recompute_of"]


def graph_cost(trace: PartitionTrace) -> GraphCost:
    """The forward and backward graphs' work (recomputed ops are in the backward graph)."""
    return _cost(node for graph in (trace.forward.graph, trace.backward.graph) for node in graph.nodes)


def recompute_cost(trace: PartitionTrace) -> GraphCost:
    """The work the backward graph does again: its ops that the forward graph also runs (the
    partitioner copies a recomputed forward op into backward under its joint-graph name)."""
    in_forward = {n.name for n in trace.forward.graph.nodes if n.op == "call_function"}
    return _cost(n for n in trace.backward.graph.nodes if n.name in in_forward)


def with_recompute_of(cost: GraphCost, trace: PartitionTrace, other: PartitionTrace) -> GraphCost:
    """``cost`` (``trace``'s work) with ``trace``'s recompute replaced by ``other``'s.

    The time model counts sampling's own changes to a dense graph's work
    (:func:`wtacompile.time_model.sampling_change`); what it cannot see is that the sampled
    partition recomputes differently under a partitioner budget below 1 (its knapsack balances
    a smaller range of saved bytes). That difference is ``other``'s recompute less ``trace``'s.
    """
    dropped, added = recompute_cost(trace), recompute_cost(other)
    negated = tuple((o, -f, -b) for o, f, b in dropped.owners)
    return GraphCost(cost.flops - dropped.flops + added.flops, cost.bytes - dropped.bytes + added.bytes,
                     cost.owners + negated + added.owners)


def _cost(nodes) -> GraphCost:
    flops: dict[str, float] = defaultdict(float)
    nbytes: dict[str, float] = defaultdict(float)
    for node in nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            owner = _work_owner(node)
            counted = node_flops(node)
            if counted is not None:
                flops[owner] += counted
            elif not is_storage_view(node):
                nbytes[owner] += _output_bytes(node.meta.get("val"))
    owners = tuple((o, flops.get(o, 0.0), nbytes.get(o, 0.0)) for o in sorted(set(flops) | set(nbytes)))
    return GraphCost(sum(flops.values()), sum(nbytes.values()), owners)


def _work_owner(node: fx.Node) -> str:
    """The module a node's work belongs to. A gradient sum AOTAutograd adds outside any module
    (the encoder output's gradient, gathered from every decoder block reading it) belongs to the
    module whose contribution it adds last: one sum per reading block, so it repeats with it."""
    path = module_path(node)
    if path:
        return path
    for arg in reversed(node.all_input_nodes):
        path = module_path(arg)
        if path:
            return path
    return owning_module(node)


def node_flops(node: fx.Node) -> float | None:
    """FLOPs of a matmul-like node, ``None`` for any other op."""
    packet = node.target.overloadpacket
    if packet in flop_registry:
        args, kwargs = torch.utils._pytree.tree_map_only(fx.Node, lambda n: n.meta.get("val"),
                                                         (node.args, node.kwargs))
        try:
            return float(size_hint(flop_registry[packet](*args, out_val=node.meta.get("val"), **kwargs)))
        except Exception:  # noqa: BLE001 - a figure for a report: an op we cannot count is no error
            return None
    name = packet.__name__
    if "scaled_dot_product" in name and "_for_cpu" in name:
        first = 1 if "backward" in name else 0  # the backward takes grad_out first
        query, key = (getattr(a, "meta", {}).get("val") for a in node.args[first:first + 2])
        if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)):
            return None
        batch_heads = size_hint(query.numel()) // (size_hint(query.shape[-2]) * size_hint(query.shape[-1]))
        forward = 4.0 * batch_heads * size_hint(query.shape[-2]) * size_hint(key.shape[-2]) * size_hint(query.shape[-1])
        return forward * (2.5 if "backward" in name else 1.0)  # as torch counts the flash kernels
    return None


def _output_bytes(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(size_hint(value.numel()) * value.element_size())
    if isinstance(value, (tuple, list)):
        return sum(_output_bytes(v) for v in value)
    return 0.0
