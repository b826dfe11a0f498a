"""Trace a dynamo graph through AOTAutograd the way the inner compiler will, keeping the split.

Why: whether sampling a linear frees memory depends on what the partitioner saves for backward
and what it recomputes — facts of the partitioned joint graph, not of the model code. The trace
uses the inner compiler's decompositions (Inductor's, unless ``inner="aot_eager"``/``"eager"``)
and the same pinned min-cut partitioner (:func:`wtacompile.lower.pinned_min_cut_partition`) under
the same partitioner budget (:func:`wtacompile.lower.partitioner_budget`) — below budget 1 after
Inductor's own joint-graph passes, as Inductor partitions — so it sees the saved set the real
compile will produce.

Tracing is most of an analysis's cost, and the joint graph does not depend on the partitioner
budget; only its split does. Within :func:`reusing_joint_graphs` a graph traced once is split
again at another budget without tracing it again (a plan or a ``mem_gb`` compile that tries
several budgets).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from wtacompile._compat import aot_trace, batch_symbols, specialize_scalar_inputs, storage_root
from wtacompile.config import WTAConfig
from wtacompile.lower import (WIDENED_FROM, effective_partitioner_budget, partitioner_budget,
                              pinned_min_cut_partition, widens_masks)
from wtacompile.solver import largest_fitting

__all__ = ["JointGraphs", "PartitionTrace", "TracedJoint", "batch_symbols_of", "copy_module", "has_subgraph_calls",
           "reusing_joint_graphs", "trace_joint", "trace_largest_fitting", "trace_partition",
           "warm_up_tracing"]


@dataclass(frozen=True)
class TracedJoint:
    """A joint graph as AOTAutograd handed it to the partitioner, and the state it was split in:
    the partitioner reads the tracing context and the fake mode (its RNG functionalisation of a
    checkpointed region's dropout, say), and runs with grad off."""

    joint: fx.GraphModule
    joint_inputs: Sequence[Any]
    kwargs: dict[str, Any]
    context: Any  # torch._guards.TracingContext
    fake_mode: Any
    grad_enabled: bool

    @contextlib.contextmanager
    def as_traced(self) -> Iterator[None]:
        """The state the partitioner ran in during the trace, for a later split."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch._guards.tracing(self.context))
            if self.fake_mode is not None:
                stack.enter_context(self.fake_mode)
            stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
            yield


#: Joint graphs traced so far, by :func:`_joint_key`, while :func:`reusing_joint_graphs` is on.
JointGraphs = dict[tuple, TracedJoint]
_JOINT_GRAPHS: contextvars.ContextVar[JointGraphs | None] = contextvars.ContextVar(
    "wtacompile_joint_graphs", default=None)


@contextlib.contextmanager
def reusing_joint_graphs(joints: JointGraphs | None = None) -> Iterator[JointGraphs]:
    """Within: a graph traced through AOTAutograd once is not traced again; each later analysis
    of it (at another partitioner budget, say) splits a copy of the joint graph it kept.

    ``joints`` keeps them beyond the block (pass the same dict again to reuse them); the
    default is a fresh one. A joint graph whose trace partitioned other graphs first is never
    kept (the bodies of ``invoke_subgraph``, split at the budget in force then), and the
    partitioner runs on a kept one as it did during the trace (:meth:`TracedJoint.as_traced`).
    """
    joints = {} if joints is None else joints
    token = _JOINT_GRAPHS.set(joints)
    try:
        yield joints
    finally:
        _JOINT_GRAPHS.reset(token)


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
    once, which is most of the cost, and within :func:`reusing_joint_graphs` not at all when
    it was traced before.
    """
    widen_masks = widens_masks(config)
    # Inductor rewrites the joint graph before it partitions; under a budget below 1 the knapsack
    # is sensitive to that (T5 at 0.5: the analysis missed four saved ReLU masks, 13% of the
    # bytes, without them). At budget 1 the min cut saves the same either way (the tests compare
    # predicted with measured bytes), and the passes would cost a plan ~6% of its time.
    joint_passes = config.inner == "inductor" and effective_partitioner_budget(config) < 1.0
    joints = _JOINT_GRAPHS.get()
    key = _joint_key(gm, config.inner, static, joint_passes) if joints is not None else None

    def split_at_largest_fitting(joint, joint_inputs, kwargs, keep: bool) -> tuple[PartitionTrace, float | None]:
        def split(graph: fx.GraphModule) -> PartitionTrace:
            forward, backward = pinned_min_cut_partition(graph, joint_inputs, widen_masks=widen_masks, **kwargs)
            return PartitionTrace(graph, forward, backward, kwargs["num_fwd_outputs"])

        def attempt(budget: float) -> PartitionTrace | None:
            with torch._functorch.config.patch(activation_memory_budget=budget):
                trial = split(copy_module(joint))
            return trial if fits(trial) else None

        found = largest_fitting(budgets, attempt)
        if found:
            return found[1], found[0]
        with partitioner_budget(config):  # the partitioner rewrites the graph it is given
            return split(copy_module(joint) if keep else joint), None

    if key is not None and key in joints:
        kept = joints[key]
        with kept.as_traced():
            return split_at_largest_fitting(kept.joint, kept.joint_inputs, kept.kwargs, keep=True)

    captured: list[tuple[PartitionTrace, float | None]] = []
    traced_joints: list[TracedJoint] = []

    def recording_partition(joint, joint_inputs, **kwargs):
        if joint_passes:  # once: they do not depend on the budget
            joint = _inductor_joint_passes(joint, joint_inputs)
        traced_joints.append(TracedJoint(joint, joint_inputs, kwargs, torch._guards.TracingContext.try_get(),
                                         torch._guards.detect_fake_mode(joint_inputs), torch.is_grad_enabled()))
        captured.append(split_at_largest_fitting(joint, joint_inputs, kwargs, keep=key is not None))
        return captured[-1][0].forward, captured[-1][0].backward

    decompositions = _decompositions(config)
    traced = copy_module(gm)
    specialize_scalar_inputs(traced)
    with partitioner_budget(config):
        aot_trace(traced, recording_partition, decompositions, static=static)
    if not captured:
        raise RuntimeError("wtacrs analysis: AOTAutograd produced no joint graph to partition")
    if key is not None and len(traced_joints) == 1 and not has_subgraph_calls(traced_joints[0].joint):
        joints[key] = traced_joints[0]
    return captured[-1]  # the outer graph's: higher-order ops' bodies are partitioned first


class _JointTraced(Exception):
    """Stops an AOTAutograd trace once its joint graph is made (see :func:`trace_joint`)."""

    def __init__(self, joint: fx.GraphModule) -> None:
        super().__init__("joint graph traced")
        self.joint = joint


def trace_joint(gm: fx.GraphModule, config: WTAConfig, at: dict) -> fx.GraphModule:
    """``gm``'s joint graph traced statically with the shape symbols in ``at`` set to the values
    there (every other at its hint), as :func:`trace_partition` traces it at partitioner budget 1,
    and cleaned up as the partitioner first cleans it (dead code, CSE), but not partitioned.

    ``at = {batch: b₀ + 1}`` gives the same graph one batch row larger: beside a static trace at
    ``b₀``, each node's size at ``b₀ + 1`` is its slope in the batch (see
    :func:`wtacompile.analysis.graph_numbers.slopes_match`). Not for graphs calling
    ``invoke_subgraph``: AOTAutograd hands their bodies to the partitioner first.
    """
    from torch._functorch.compile_utils import fx_graph_cse

    def stop_at_joint(joint, _joint_inputs, **_kwargs):
        raise _JointTraced(joint)

    traced = copy_module(gm)
    specialize_scalar_inputs(traced)
    try:
        aot_trace(traced, stop_at_joint, _decompositions(config), static=True, at=at)
    except _JointTraced as done:
        joint = done.joint
    else:
        raise RuntimeError("wtacrs analysis: AOTAutograd produced no joint graph")
    joint.graph.eliminate_dead_code()
    if torch._functorch.config.cse:
        joint.graph = fx_graph_cse(joint.graph)
    return joint


class _TwoLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Uninitialised, on the CPU: no draw from the user's random stream, no default device.
        self.first = torch.nn.Linear(8, 8, device="meta").to_empty(device="cpu")
        self.second = torch.nn.Linear(8, 4, device="meta").to_empty(device="cpu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.second(torch.nn.functional.silu(self.first(x))),)


@functools.cache
def warm_up_tracing(inner: str) -> None:
    """Trace a graph of two linears through :func:`trace_partition` once per process and inner
    compiler, so that the imports and one-time setup of AOTAutograd's first trace (about 150
    modules, Inductor's decomposition table: ~0.8 s on two CPU cores) are done before a trace is
    forked (:func:`wtacompile.analysis.forked.beside`): each child inherits them instead of
    paying for them again, on the cores the other traces need."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = fx.symbolic_trace(_TwoLinears())
    fake_mode = FakeTensorMode()
    for placeholder in graph.graph.find_nodes(op="placeholder"):
        placeholder.meta["example_value"] = fake_mode.from_tensor(torch.empty(2, 8, device="cpu"))
    token = _JOINT_GRAPHS.set(None)  # not one of the model's joint graphs: kept nowhere
    try:
        with torch.enable_grad():
            trace_partition(graph, WTAConfig(inner=inner), static=True)
    finally:
        _JOINT_GRAPHS.reset(token)


def _decompositions(config: WTAConfig):
    """The inner compiler's decompositions (Inductor's; none for the others)."""
    if config.inner != "inductor":
        return None
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def batch_symbols_of(gm: fx.GraphModule) -> tuple[dict, int] | None:
    """The batch's shape symbols among ``gm``'s inputs and the batch traced (see
    :func:`wtacompile._compat.batch_symbols`), or ``None``."""
    return batch_symbols(n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder"))


def has_subgraph_calls(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` (a joint or a dynamo graph) calls ``invoke_subgraph`` bodies (partitioned
    during the trace, perhaps by a partitioner of their own that never reaches ours)."""
    target = getattr(torch.ops.higher_order, "invoke_subgraph", None)
    return target is not None and any(gm.graph.find_nodes(op="call_function", target=target))


def _joint_key(gm: fx.GraphModule, inner: str, static: bool, joint_passes: bool) -> tuple:
    """What a joint graph depends on besides torch's settings: ``gm``'s code and its inputs (their
    traced sizes, as AOTAutograd reads them), the inner compiler's decompositions, a static
    trace, Inductor's joint-graph passes."""
    inputs = tuple(_input_signature(n.meta.get("example_value")) for n in gm.graph.find_nodes(op="placeholder"))
    return gm.code, inputs, inner, static, joint_passes


def _input_signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # Symbolic sizes print alike in every shape environment: the fake mode tells them apart
        # (it lives as long as the graph whose inputs it made; a real tensor has none).
        return (str(tuple(value.shape)), str(value.stride()), value.dtype, value.device, value.requires_grad,
                id(getattr(value, "fake_mode", None)))
    return repr(value)


def _inductor_joint_passes(joint: fx.GraphModule, joint_inputs) -> fx.GraphModule:
    """The joint-graph passes Inductor runs before it partitions (its pattern rewrites change
    what the partitioner can save: a ReLU's mask, which it computes where)."""
    from torch._inductor.compile_fx import _recursive_joint_graph_passes, get_inputs_devices
    from torch._inductor.virtualized import V

    devices = get_inputs_devices(joint_inputs, joint)  # as Inductor's partition_fn passes it
    # Inductor runs them under its compile's fake mode; the random-op rewrites (a dropout's
    # seeds) enter it.
    with V.set_fake_mode(torch._guards.detect_fake_mode(joint_inputs)):
        return _recursive_joint_graph_passes(joint, skip_invoke_subgraph=True,
                                             input_device=next(iter(devices), None))


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` to trace or rewrite freely: same node names, and the module meta
    AOTAutograd reads (which inputs are parameters: the partitioner treats those as free)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy
