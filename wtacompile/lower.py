"""Lowering: the inner compiler the rewritten graph goes on to, and what the partitioner needs.

The sampled rows and their indices are a *random* choice made in forward. If the backward graph
ran the sampling op it would draw again — a different sample than forward saw, from an input the
partitioner would then have to keep alive: wrong pairing and no memory saved. Two things keep the
draw in forward:

* :func:`expose_samples` — the partitioner places in the forward graph only what the forward's
  outputs depend on; the forward matmul does not read the sample (only its backward does), so
  each sample's ``index`` and ``x_saved`` become extra outputs of the graph, which the compiled
  function drops again (:func:`compile_graph`).
* :func:`pin_sampled_choices` — ``CheckpointPolicy.MUST_SAVE`` on the sampling op, so that
  ``torch._functorch.config.activation_memory_budget < 1`` (whose knapsack reconsiders even banned
  nodes) never recomputes it. It runs on the joint graph right before partitioning: through
  Inductor's ``joint_custom_pre_pass`` hook, and through :func:`pinned_min_cut_partition` for the
  ``aot_eager`` inner compiler and the analysis traces.

:func:`pinned_min_cut_partition` also solves the partitioner's min cuts with Boykov–Kolmogorov
instead of networkx's default preflow-push (:func:`faster_min_cut`): the same partition, in a
tenth of the time on transformer joint graphs, which is most of what a plan costs.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

from wtacompile.config import WTAConfig

__all__ = [
    "PinSampledChoices",
    "compile_graph",
    "effective_partitioner_budget",
    "expose_samples",
    "inner_compiler",
    "partitioner_budget",
    "pin_sampled_choices",
    "pinned_min_cut_partition",
]


def expose_samples(gm: fx.GraphModule) -> int:
    """Append every sample's ``index`` and ``x_saved`` to ``gm``'s outputs (only the ``index`` where
    the rewrite left the rows to backward); returns how many outputs ``gm`` had before."""
    from wtacompile.ops import sample_input
    from wtacompile.passes.rewrite_sampled import ROWS_IN_BACKWARD

    output = gm.graph.output_node()
    values = output.args[0]
    extra = [user for node in gm.graph.find_nodes(op="call_function", target=sample_input)
             for user in node.users if user.target is operator.getitem and not user.meta.get(ROWS_IN_BACKWARD)]
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"expected a dynamo graph returning a tuple, got {type(values).__name__}")
    if extra:
        output.args = (tuple(values) + tuple(extra),)
        gm.graph.lint()
        gm.recompile()
    return len(values)


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], config: WTAConfig,
                  mode: str | None) -> Callable:
    """Compile the rewritten graph with the inner compiler, samples exposed and dropped again,
    and the sampler states (the placeholders the rewrite added after dynamo's) passed on each call."""
    from wtacompile.grad_predictor import state_for
    from wtacompile.passes.rewrite_sampled import SAMPLER_STATES

    compiler = inner_compiler(config, mode)
    slots = tuple(gm.meta.get(SAMPLER_STATES, ()))
    example_inputs = [*example_inputs, *(slot.tensor for slot in slots)]

    def states(args) -> tuple:
        return tuple(slot.tensor if slot.weight_input is None else state_for(args[slot.weight_input])
                     for slot in slots)

    if config.inner == "eager":  # plain autograd: no partitioner to keep the draw in forward
        compiled = compiler(gm, example_inputs)
        return (lambda *args: compiled(*args, *states(args))) if slots else compiled
    num_outputs = expose_samples(gm)
    with partitioner_budget(config):  # AOTAutograd partitions while compiling, not at first call
        compiled = compiler(gm, example_inputs)
    if len(gm.graph.output_node().args[0]) == num_outputs and not slots:
        return compiled
    return lambda *args: compiled(*args, *states(args))[:num_outputs]  # dynamo calls backends' functions unboxed


def effective_partitioner_budget(config: WTAConfig) -> float:
    """The partitioner budget ``config``'s graphs are compiled under: its own, else torch's."""
    if config.activation_memory_budget is not None:
        return config.activation_memory_budget
    return torch._functorch.config.activation_memory_budget


def partitioner_budget(config: WTAConfig) -> contextlib.AbstractContextManager:
    """torch's ``activation_memory_budget`` set to ``config``'s for the duration (unchanged where
    the config leaves it to torch's global setting)."""
    if config.activation_memory_budget is None:
        return contextlib.nullcontext()
    return torch._functorch.config.patch(activation_memory_budget=config.activation_memory_budget)


def pin_sampled_choices(graph: fx.Graph) -> None:
    """Mark every ``wtacompile::sample_rows`` node and its outputs ``MUST_SAVE``."""
    target = torch.ops.wtacompile.sample_rows.default
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


@contextlib.contextmanager
def faster_min_cut():
    """``networkx.minimum_cut`` with the Boykov–Kolmogorov max-flow for the duration.

    The partition is the same as with the default (preflow-push) whatever the max-flow
    algorithm: ``minimum_cut`` returns as the sink side ``T`` the nodes that reach the sink in the
    residual network of the maximum (pre)flow it found. Every maximum preflow saturates every
    edge out of the source side of every minimum cut and carries nothing back, so no node of any
    minimum cut's source side reaches the sink: ``T`` is the intersection of the sink sides of all
    minimum cuts, one set, whichever flow reached it. (Capacities are floats; the flows compared
    against them are sums of the same capacities, and on 47 cuts of eight families' graphs, at
    budgets 1 and 0.5, the partitions were identical — ``tests/test_passes.py`` checks some.)
    On those graphs it is 8–10× faster: preflow-push spends seconds relabelling the long chains
    of a transformer's joint graph.
    """
    import networkx as nx
    from networkx.algorithms.flow import boykov_kolmogorov

    default = nx.minimum_cut
    nx.minimum_cut = functools.partial(default, flow_func=boykov_kolmogorov)
    try:
        yield
    finally:
        nx.minimum_cut = default


@functools.wraps(min_cut_rematerialization_partition)
def pinned_min_cut_partition(joint_module: fx.GraphModule, joint_inputs, **kwargs):
    """Inductor's min-cut partitioner, after :func:`pin_sampled_choices`, its min cuts solved by
    :func:`faster_min_cut`."""
    pin_sampled_choices(joint_module.graph)
    with faster_min_cut():
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
