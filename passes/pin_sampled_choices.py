"""Forbid the partitioner from recomputing the sampling op in backward (a joint-graph pass).

Why: the sampled rows and their indices are a *random* choice made in forward. If backward
recomputed the op it would draw again — a different sample than forward saw, from an input the
partitioner would then have to keep alive, i.e. wrong pairing and no memory saved. The min-cut
partitioner bans random and custom ops from recomputation, but under
``torch._functorch.config.activation_memory_budget < 1`` its knapsack reconsiders banned nodes
and does recompute them. ``CheckpointPolicy.MUST_SAVE`` is the one mark every path honours.

Unlike the other passes this one runs on the AOTAutograd joint graph, right before partitioning:
through Inductor's ``joint_custom_pre_pass`` hook, and through our own partition wrapper for the
``aot_eager`` inner compiler and the analysis traces.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

__all__ = ["PinSampledChoices", "pin_sampled_choices", "pinned_min_cut_partition"]


def pin_sampled_choices(graph: fx.Graph) -> None:
    """Mark every ``wtacompile::sampled_linear`` node and its outputs ``MUST_SAVE``."""
    target = torch.ops.wtacompile.sampled_linear.default
    for node in graph.find_nodes(op="call_function", target=target):
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        for user in node.users:
            user.meta["recompute"] = CheckpointPolicy.MUST_SAVE


class PinSampledChoices(CustomGraphPass):
    """:func:`pin_sampled_choices` as an Inductor custom pass (hashable for the FX graph cache),
    running a pass the user had configured first."""

    def __init__(self, previous=None) -> None:
        self.previous = previous

    def __call__(self, graph: fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        pin_sampled_choices(graph)

    def uuid(self):
        previous = self.previous.uuid() if hasattr(self.previous, "uuid") else self.previous
        return ("wtacompile.pin_sampled_choices.v1", previous)


def pinned_min_cut_partition(joint_module: fx.GraphModule, joint_inputs, **kwargs):
    """Inductor's min-cut partitioner, after :func:`pin_sampled_choices`."""
    pin_sampled_choices(joint_module.graph)
    return min_cut_rematerialization_partition(joint_module, joint_inputs, compiler="inductor", **kwargs)


pinned_min_cut_partition = functools.wraps(min_cut_rematerialization_partition)(pinned_min_cut_partition)
