"""Lowering: the inner compiler the rewritten graph goes on to, and the partitioner hook it needs.

Why the hook: the sampled rows and their indices are a *random* choice made in forward. If
backward recomputed the sampling op it would draw again — a different sample than forward saw,
from an input the partitioner would then have to keep alive: wrong pairing and no memory saved.
By default the min-cut partitioner already bans custom (non-builtin) ops from recomputation, but
under ``torch._functorch.config.activation_memory_budget < 1`` its knapsack reconsiders banned
nodes and does recompute them. ``CheckpointPolicy.MUST_SAVE`` is the one mark every path honours,
so :func:`pin_sampled_choices` sets it on the joint graph, right before partitioning: through
Inductor's ``joint_custom_pre_pass`` hook, and through :func:`pinned_min_cut_partition` for the
``aot_eager`` inner compiler and the analysis traces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

from wtacompile.config import WTAConfig

__all__ = ["PinSampledChoices", "inner_compiler", "pin_sampled_choices", "pinned_min_cut_partition"]


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


@functools.wraps(min_cut_rematerialization_partition)
def pinned_min_cut_partition(joint_module: fx.GraphModule, joint_inputs, **kwargs):
    """Inductor's min-cut partitioner, after :func:`pin_sampled_choices`."""
    pin_sampled_choices(joint_module.graph)
    return min_cut_rematerialization_partition(joint_module, joint_inputs, compiler="inductor", **kwargs)


def inner_compiler(config: WTAConfig, mode: str | None) -> Callable:
    """The compiler for the rewritten dynamo graph, with the sampling op pinned in its partition."""
    if config.inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
        patches["joint_custom_pre_pass"] = PinSampledChoices(torch._inductor.config.joint_custom_pre_pass)
        return functools.partial(compile_fx, config_patches=patches)
    if config.inner == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop

        # The partitioner Inductor uses, so the saved set matches what the analysis traced.
        return aot_autograd(
            fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=pinned_min_cut_partition
        )
    return lambda gm, _inputs: gm.forward
