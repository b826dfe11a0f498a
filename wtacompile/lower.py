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
import contextvars
import functools
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomGraphPass, CustomPartitionerFn
from torch.utils.checkpoint import CheckpointPolicy

from wtacompile._compat import dynamo_origin, is_storage_view, size_hint, storage_root
from wtacompile.config import WTAConfig

__all__ = [
    "PinSampledChoices",
    "SAVED_DTYPE",
    "WIDENED_FROM",
    "WtacrsPartitioner",
    "compile_graph",
    "effective_partitioner_budget",
    "expose_samples",
    "inner_compiler",
    "partitioner_budget",
    "pin_sampled_choices",
    "pinned_min_cut_partition",
    "sampled_storage",
    "target_device",
    "widen_cpu_saved_masks",
    "widens_masks",
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


def pin_sampled_choices(graph: fx.Graph) -> int:
    """Mark every ``wtacompile::sample_rows`` node and its outputs ``MUST_SAVE``; returns how many
    there are."""
    samples = graph.find_nodes(op="call_function", target=torch.ops.wtacompile.sample_rows.default)
    for node in samples:
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        for user in node.users:
            user.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    return len(samples)


#: Below this many elements a mask costs too little to be worth a node.
_MIN_MASK_NUMEL = 1 << 14


#: node.meta key on a joint-graph node the forward saves in another dtype than its own (the
#: analysis sizes it so), and on the forward node that saves it: the joint node's name.
SAVED_DTYPE = "wtacompile_saved_dtype"
WIDENED_FROM = "wtacompile_widened_from"


def widen_cpu_saved_masks(forward: fx.GraphModule, backward: fx.GraphModule, num_fwd_outputs: int,
                          joint: fx.Graph) -> list[fx.Node]:
    """Save each large boolean mask computed from a sampled input, which forward hands backward on
    CPU, as bf16 instead; returns the joint-graph nodes of those widened.

    Why: where sampling frees a ReLU's output (T5's ``wo`` input), the partitioner saves the
    1-byte mask ``out <= 0`` for the ReLU's backward instead of the 4-byte output. Inductor's
    CPU code writes a ``bool`` buffer through a generic mask conversion, about 30× slower than
    eager (measured on this project's 2-core CPU for 1024 × 1536: 7 ms against 0.25 ms; a
    ``uint8`` buffer 2.2 ms, a bf16 one 0.5 ms). So forward returns ``bf16(m)`` and backward
    reads ``bf16(m) ≠ 0``: the same booleans (``bf16(True) = 1``), so every gradient is
    unchanged bit for bit, for one more byte per element. Only masks read from the storage of an
    input a ``sample_rows`` node samples, computed in forward (not a graph input, not a view):
    other masks (dropout's, a ``where``'s condition) are saved as plain Inductor saves them, so
    a dense graph compiles as plain Inductor would. (Splitting after the cut, not steering it:
    a joint-graph rewrite left the partitioner saving the 4-byte output instead.) Where it runs
    is the caller's choice: Inductor on CPU (:class:`WtacrsPartitioner`, and the analysis of an
    Inductor compile on CPU), not ``aot_eager``, not a GPU.
    """
    sampled_roots = {sampled_storage(n) for n in joint.find_nodes(
        op="call_function", target=torch.ops.wtacompile.sample_rows.default)}
    joint_nodes = {n.name: n for n in joint.nodes}
    output = forward.graph.output_node()
    values = list(output.args[0])
    inputs = {n.name: n for n in backward.graph.find_nodes(op="placeholder")}
    widened = []
    for position in range(num_fwd_outputs, len(values)):
        saved = values[position]
        value = saved.meta.get("val") if isinstance(saved, fx.Node) else None
        reader = inputs.get(saved.name) if value is not None else None
        twin = joint_nodes.get(saved.name) if value is not None else None
        if (reader is None or twin is None or not isinstance(value, torch.Tensor) or value.dtype != torch.bool
                or value.device.type != "cpu" or size_hint(value.numel()) < _MIN_MASK_NUMEL
                or twin.op != "call_function" or is_storage_view(twin)
                or not any(storage_root(a) in sampled_roots for a in twin.all_input_nodes)):
            continue
        fake_mode = getattr(value, "fake_mode", None)
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            wide_value = value.to(torch.bfloat16)
        with forward.graph.inserting_before(output):
            wide = forward.graph.create_node("call_function", torch.ops.prims.convert_element_type.default,
                                             (saved, torch.bfloat16), name=f"wtacompile_wide_{saved.name}")
        wide.meta.update({"val": wide_value, WIDENED_FROM: saved.name})
        if "saved_tensor_with_no_vc_check" in saved.meta:  # where AOTAutograd counts it
            wide.meta["saved_tensor_with_no_vc_check"] = saved.meta["saved_tensor_with_no_vc_check"]
        values[position] = wide
        with backward.graph.inserting_after(reader):
            mask = backward.graph.create_node("call_function", torch.ops.aten.ne.Scalar, (reader, 0),
                                              name=f"wtacompile_mask_{reader.name}")
        mask.meta["val"] = value
        reader.replace_all_uses_with(mask, delete_user_cb=lambda user: user is not mask)
        reader.meta["val"] = wide_value
        widened.append(twin)
    if widened:
        output.args = (tuple(values),)
        for module in (forward, backward):
            module.graph.lint()
            module.recompile()
    return widened


def sampled_storage(node: fx.Node) -> fx.Node:
    """The storage a ``sample_rows`` node samples: up its argument chain (the norms, reshape and
    detach the sampling call itself traced) to the first tensor from elsewhere."""
    origin, x = dynamo_origin(node), node.args[0]
    while dynamo_origin(x) == origin and x.op == "call_function" and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return storage_root(x)


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


_MIN_CUT_SWAP = threading.RLock()
#: The device a plan is made for, while ``plan()`` traces (fake tensors are on the CPU even for a
#: model planned for a GPU); ``None``: the traced tensors' own device.
_TARGET_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("wtacompile_target_device",
                                                                           default=None)


@contextlib.contextmanager
def target_device(device_type: str):
    """Analyse graphs as compiled for ``device_type`` (``plan()`` of a meta model for a GPU)."""
    token = _TARGET_DEVICE.set(device_type)
    try:
        yield
    finally:
        _TARGET_DEVICE.reset(token)


def widens_masks(config: WTAConfig) -> bool:
    """Whether a compile under ``config`` saves sampled inputs' masks wide: Inductor, on CPU (for
    an analysis inside ``plan()``, the device planned for)."""
    return config.inner == "inductor" and _TARGET_DEVICE.get() in (None, "cpu")


@contextlib.contextmanager
def faster_min_cut():
    """``networkx.minimum_cut`` with the Boykov–Kolmogorov max flow for the duration.

    In exact arithmetic the partition does not depend on the max-flow algorithm:
    ``minimum_cut`` returns as the sink side ``T`` the nodes that reach the sink in the residual
    network of the maximum (pre)flow it found. Every maximum preflow saturates every edge out of
    the source side of every minimum cut and carries nothing back, so no node of any minimum
    cut's source side reaches the sink: ``T`` is the intersection of the sink sides of all
    minimum cuts, one set, whichever flow reached it. networkx tests saturation with
    ``flow == capacity`` on float capacities, and the two algorithms add them up along
    different paths, so equality is checked, not only argued: on 47 cuts of eight families'
    graphs, at budgets 1 and 0.5, the partitions were identical (``tests/test_passes.py`` checks
    two families). On those graphs it is 8–10× faster: preflow-push spends seconds relabelling
    the long chains of a transformer's joint graph. The swap is held under a lock (compiles in
    other threads wait rather than restore each other's function); other networkx callers in
    the window get the same cut from the other algorithm.
    """
    import networkx as nx
    from networkx.algorithms.flow import boykov_kolmogorov

    with _MIN_CUT_SWAP:
        default = nx.minimum_cut
        nx.minimum_cut = functools.partial(default, flow_func=boykov_kolmogorov)
        try:
            yield
        finally:
            nx.minimum_cut = default


@functools.wraps(min_cut_rematerialization_partition)
def pinned_min_cut_partition(joint_module: fx.GraphModule, joint_inputs, *, widen_masks: bool = False,
                             **kwargs):
    """Inductor's min-cut partitioner, after :func:`pin_sampled_choices`, its min cuts solved by
    :func:`faster_min_cut`, each draw then ordered after the first matmul reading its input
    (:func:`wtacompile.scheduling.draw_after_first_matmul`); with ``widen_masks`` (Inductor on
    CPU) boolean masks of sampled inputs saved wide (:func:`widen_cpu_saved_masks`), their joint
    nodes marked :data:`SAVED_DTYPE` for the analysis."""
    sampled = pin_sampled_choices(joint_module.graph)
    kwargs.pop("compiler", None)
    with faster_min_cut():
        forward, backward = min_cut_rematerialization_partition(joint_module, joint_inputs,
                                                                compiler="inductor", **kwargs)
    if sampled and widen_masks:  # on the partitioner's (CSE'd) joint graph
        for twin in widen_cpu_saved_masks(forward, backward, kwargs["num_fwd_outputs"], joint_module.graph):
            twin.meta[SAVED_DTYPE] = torch.bfloat16
    if sampled:
        from wtacompile.scheduling import draw_after_first_matmul

        if draw_after_first_matmul(forward.graph):
            forward.recompile()
    return forward, backward


class WtacrsPartitioner(CustomPartitionerFn):
    """:func:`pinned_min_cut_partition` as Inductor's ``custom_partitioner_fn`` (Inductor runs its
    joint-graph passes first, which the analysis traces do not), with the masks widened."""

    def __call__(self, gm: fx.GraphModule, joint_inputs, **kwargs):
        return pinned_min_cut_partition(gm, joint_inputs, widen_masks=True, **kwargs)

    def uuid(self):
        from torch._inductor.custom_graph_pass import get_hash_for_files

        from wtacompile import scheduling

        return ("wtacompile.pinned_min_cut_partition", get_hash_for_files((__file__, scheduling.__file__)),
                _MIN_MASK_NUMEL)


def inner_compiler(config: WTAConfig, mode: str | None) -> Callable:
    """The compiler for the rewritten dynamo graph, with the sampling op pinned in its partition."""
    if config.inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
        patches["joint_custom_pre_pass"] = PinSampledChoices(torch._inductor.config.joint_custom_pre_pass)
        if torch._inductor.config.custom_partitioner_fn is None:  # a user's own partitioner stays
            patches["custom_partitioner_fn"] = WtacrsPartitioner()
        return functools.partial(compile_fx, config_patches=patches)
    if config.inner == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop

        # The partitioner Inductor uses, so the saved set matches what the analysis traced.
        return aot_autograd(
            fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=pinned_min_cut_partition
        )
    return lambda gm, _inputs: gm.forward
