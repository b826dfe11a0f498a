"""Read a partitioned joint graph as numbers: sizes, saved bytes, the backward's live bytes.

Sizes are :class:`~wtacompile.memory_model.Size` s: exact as traced, and affine in the batch when
the graph was traced with a symbolic batch dimension (a tensor's numel is linear in the batch:
one dimension carries it), read off by evaluating the numel expression at ``b₀`` and ``b₀ + 1``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch._inductor.config  # optimize_scatter_upon_const_tensor, read by _is_pointwise
import torch.fx as fx

from wtacompile._compat import (
    dynamo_origin,
    evaluate_at,
    is_storage_view,
    batch_symbols,
    size_hint,
    storage_root,
)
from wtacompile.lower import SAVED_DTYPE
from wtacompile.memory_model import Allocation, GraphMemory, Size
from .partition_trace import PartitionTrace

__all__ = ["NodeSketch", "Sizer", "graph_memory", "module_path", "owning_module", "provenance_keys",
           "saved_bytes", "sketch", "slopes_match"]


@dataclass(frozen=True)
class NodeSketch:
    """What :class:`Sizer` and :func:`slopes_match` read of a node of a graph traced one batch
    row larger: plain data, so that a forked process can send it back
    (:mod:`wtacompile.analysis.forked`)."""

    op: str
    # str(node.target): an aten overload prints as its qualified name (a plain Python function
    # as its address, which a joint graph's call_function nodes do not carry in practice).
    target: str
    inputs: tuple[str, ...]
    numel: int | None  # None: not a tensor


def sketch(gm: fx.GraphModule) -> dict[str, NodeSketch]:
    """Each node of ``gm`` by name, as :class:`NodeSketch` (a static graph: numels are ints)."""
    sketches = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        numel = size_hint(value.numel()) if isinstance(value, torch.Tensor) else None
        sketches[node.name] = NodeSketch(node.op, str(node.target), tuple(a.name for a in node.all_input_nodes),
                                         numel)
    return sketches


class Sizer:
    """Bytes of joint-graph nodes as :class:`Size` s (cached: one evaluation per node).

    Affine in the batch when ``joint`` was traced with a symbolic batch (the numel evaluated at
    ``b₀ + 1``), or when ``next_batch`` sketches the same joint graph traced statically one batch
    row larger (:func:`~wtacompile.analysis.partition_trace.trace_joint`, :func:`sketch`;
    :func:`slopes_match` must hold): the slope is the difference of a node's sizes in the two,
    matched by name. Otherwise static.
    """

    def __init__(self, joint: fx.GraphModule, parameter_inputs: set[str],
                 next_batch: Mapping[str, NodeSketch] | None = None) -> None:
        self._next = next_batch
        self._batch = _batch_symbols(joint, parameter_inputs) if next_batch is None else None
        self._cache: dict[fx.Node, Size] = {}

    @property
    def symbolic(self) -> bool:
        return self._batch is not None or self._next is not None

    def __call__(self, node: fx.Node) -> Size:
        if node not in self._cache:
            self._cache[node] = self._size(node)
        return self._cache[node]

    def _size(self, node: fx.Node) -> Size:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return Size(0, 0 if self.symbolic else None)
        # Saved in another dtype than computed (a boolean mask kept as bf16 on CPU).
        itemsize = node.meta.get(SAVED_DTYPE, value.dtype).itemsize
        numel = value.numel()
        traced = size_hint(numel) * itemsize
        if self._next is not None:
            return Size(traced, self._next[node.name].numel * itemsize - traced)
        if self._batch is None:
            return Size(traced)
        if not isinstance(numel, torch.SymInt):
            return Size(traced, 0)
        symbols, b0 = self._batch
        # Other symbols (a dynamic sequence length) keep their traced values.
        return Size(traced, evaluate_at(numel, dict.fromkeys(symbols, b0 + 1)) * itemsize - traced)


def slopes_match(partitioned: PartitionTrace, next_batch: Mapping[str, NodeSketch]) -> bool:
    """Whether ``next_batch`` (the :func:`sketch` of the joint graph of ``partitioned`` traced one
    batch row larger, dead code removed and CSE'd as the partitioner does) can give each node of
    ``partitioned`` its slope (see :class:`Sizer`): every computed node of the joint graph has a twin of the same
    name, op and input names, and every tensor of the forward and backward graphs (which receive
    saved values as inputs named after them) a twin of its name.

    Traces at two batch sizes take the same decompositions unless the code branches on the
    batch; CSE can still merge two nodes at one size and not at the other (``x * 2`` and
    ``x * batch`` at batch 2), which the input names show. A node the partitioner makes has no
    twin (a widened mask: only sampled graphs have them)."""
    for node in partitioned.joint.graph.nodes:
        twin = next_batch.get(node.name)
        if node.op == "call_function" and (twin is None or twin.target != str(node.target) or
                                           twin.inputs != tuple(a.name for a in node.all_input_nodes)):
            return False
    for graph in (partitioned.joint, partitioned.forward, partitioned.backward):
        for node in graph.graph.nodes:
            if node.op == "output" or not isinstance(node.meta.get("val"), torch.Tensor):
                continue
            twin = next_batch.get(node.name)
            if twin is None or twin.numel is None:
                return False
    return True


def _batch_symbols(joint: fx.GraphModule, parameter_inputs: set[str]) -> tuple[dict, int] | None:
    """The batch's symbols among the joint graph's inputs (see :func:`batch_symbols`)."""
    return batch_symbols(n.meta.get("val") for n in joint.graph.find_nodes(op="placeholder")
                         if n.name not in parameter_inputs)


def graph_memory(trace: PartitionTrace, parameter_inputs: set[str], sizer: Sizer,
                 fuses_pointwise: bool = False) -> GraphMemory:
    """The partition's saved activations and backward live-bytes curve, parameters excluded;
    ``fuses_pointwise``: the backward is compiled by Inductor (see :func:`_materialized`)."""
    zero = Size(0, 0 if sizer.symbolic else None)
    saved_owners = [(module_path(node), sizer(node)) for node in _saved_nodes(trace, parameter_inputs)]
    saved = sum((size for _, size in saved_owners), zero)
    live, allocations = _backward_live(trace, parameter_inputs, sizer, zero, fuses_pointwise)
    return GraphMemory(saved, live, tuple(saved_owners), allocations)


def saved_bytes(trace: PartitionTrace, parameter_inputs: set[str], sizer: Sizer) -> Size:
    """The partition's saved activations alone (``graph_memory(...).activations``, without the
    backward's live curve)."""
    return sum((sizer(node) for node in _saved_nodes(trace, parameter_inputs)),
               Size(0, 0 if sizer.symbolic else None))


def _saved_nodes(trace: PartitionTrace, parameter_inputs: set[str]) -> list[fx.Node]:
    nodes = trace.joint_nodes
    return [nodes[name] for name in sorted(trace.saved_roots - parameter_inputs) if name in nodes]


# The compiled frame's model: ``L['self']``, or ``L['args'][0]`` under a ``*args`` forward wrapper.
_ROOT_OBJECT = re.compile(r"^(?:L\['args'\]\[\d+\]|L\['[^']*'\])")
_MODULE_DICT = re.compile(r"(?:__dict__\.)?_modules\.")  # a wrapper's module reached by __getattr__ (PEFT)
_MODULE_KEY = re.compile(r"\._modules\['([^']*)'\]|\['([^']*)'\]|\[(\d+)\]")


_SOURCE_ROOT = re.compile(r"^[A-Za-z_]\w*(?:\[[^\]]*\])*")


def _root_object(source: str) -> str:
    """The object a module source starts from: ``L['args'][0]`` of ``L['args'][0].model.layers.0``."""
    match = _SOURCE_ROOT.match(source)
    return match.group(0) if match else source


def module_path(node: fx.Node) -> str:
    """The dotted path (as in ``named_modules()``) of the innermost module ``node`` was traced in:
    a forward node's ``nn_module_stack``, a backward node's ``fwd_nn_module_stack``; "" if none."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return ""
    sources = [source for source, _ in stack.values()]
    # A module the model's code reaches from elsewhere is not one of the model's: transformers
    # >= 5.25 wraps functions such as Llama's apply_rotary_pos_emb in a module held by the
    # modeling file (G['__import_…modeling_llama'].apply_rotary_pos_emb). What it computes
    # belongs to the model's module that called it.
    root = _root_object(sources[0])
    path = _ROOT_OBJECT.sub("", next(s for s in reversed(sources) if _root_object(s) == root))
    path = _MODULE_KEY.sub(lambda m: "." + next(g for g in m.groups() if g is not None), path)
    return _MODULE_DICT.sub("", path).lstrip(".")


def _backward_live(trace: PartitionTrace, parameter_inputs: set[str], sizer: Sizer, zero: Size,
                   fuses_pointwise: bool = False) -> tuple[tuple[Size, ...], tuple[Allocation, ...]]:
    """Live bytes after each allocation while the backward graph runs, and the allocations.

    An allocation without a module of its own belongs to its nearest user's (:func:`_owner`).
    With ``fuses_pointwise`` only the tensors Inductor materialises allocate (:func:`_materialized`).

    Saved inputs and intermediates are freed after their last use (AOTAutograd's boxed calling
    convention clears its argument list); the gradients it returns stay. Views own no storage.
    Parameters, and saved views of them (a transposed weight), are not counted.
    """
    nodes = [n for n in trace.backward.graph.nodes if n.op != "output"]
    position = {n: i for i, n in enumerate(nodes)}
    forward_nodes = {n.name: n for n in trace.forward.graph.nodes}
    excluded = set(parameter_inputs) | {
        n.name for n in nodes if n.op == "placeholder" and n.name in forward_nodes
        and storage_root(forward_nodes[n.name]).name in parameter_inputs
    }
    output = trace.backward.graph.find_nodes(op="output")[0]
    returned = {storage_root(n) for n in output.all_input_nodes}
    # When a node's reads happen: at its own position, or for a value Inductor inlines, in the
    # kernel that materialises its last reader (its inputs stay alive until that kernel runs).
    inlined = {n for n in nodes if fuses_pointwise and storage_root(n) is n and n not in returned
               and not _materialized(n)}
    runs_at = dict(position)
    if fuses_pointwise:
        for node in reversed(nodes):
            if node in inlined or (storage_root(node) is not node and node not in returned):
                runs_at[node] = max((runs_at[u] for u in node.users if u in runs_at), default=position[node])
    dies_after: dict[fx.Node, int] = {n: position[n] for n in nodes if storage_root(n) is n}
    for node in nodes:
        for arg in node.all_input_nodes:
            base = storage_root(arg)
            dies_after[base] = max(dies_after[base], runs_at[node])
    releases: dict[int, list[fx.Node]] = defaultdict(list)
    for base, when in dies_after.items():
        if base not in returned:
            releases[when].append(base)

    def counted(node: fx.Node) -> bool:
        return isinstance(node.meta.get("val"), torch.Tensor) and node.name not in excluded and node not in inlined

    live, curve, made = zero, [], []
    last_live: dict[fx.Node, int] = {}  # a released storage: the last point it was alive at
    for i, node in enumerate(nodes):
        if storage_root(node) is node and counted(node):
            live = live + sizer(node)
            curve.append(live)
            made.append(node)
        for base in releases[i]:
            if counted(base):
                live = live - sizer(base)
                last_live[base] = len(curve) - 1
    allocations = tuple(
        Allocation(owning_module(node), sizer(node), last_live.get(node),
                   gradient_step=node.op != "placeholder" and "nn_module_stack" not in node.meta)
        for node in made)
    return tuple(curve), allocations


def _materialized(node: fx.Node) -> bool:
    """Whether Inductor gives ``node`` a buffer of its own.

    Inductor inlines a pointwise op into the kernels that read it, as long as they are pointwise
    ops or reductions too (through views): such a value is never allocated. Anything else — a GEMM,
    attention, an index or scatter, a reduction's result, a pointwise value an extern kernel reads —
    is. (Inductor may still realise a pointwise value read by many kernels; this counts it as
    inlined, which the measured peaks in ``benchmarks/bench_joint.py`` check.)
    """
    if node.op != "call_function" or not _is_pointwise(node):
        return True
    return any(not _fuses_into(user) for user in node.users)


def _is_pointwise(node: fx.Node) -> bool:
    """Pointwise for Inductor: tagged so, a constant fill (computed inside the reading kernel), or
    a scatter into one (Inductor rewrites it as a ``where`` on an index comparison: the one-hot
    of a cross-entropy's backward)."""
    if node.op != "call_function":
        return False
    if node.target in _FILLS or torch.Tag.pointwise in getattr(node.target, "tags", ()):
        return True
    return (node.target in _SCATTERS and isinstance(node.args[0], fx.Node)
            and node.args[0].target in _FILLS and torch._inductor.config.optimize_scatter_upon_const_tensor)


_FILLS = frozenset({torch.ops.aten.full.default, torch.ops.aten.zeros.default, torch.ops.aten.ones.default,
                    torch.ops.aten.scalar_tensor.default})
_SCATTERS = frozenset({torch.ops.aten.scatter.value, torch.ops.aten.scatter.src})


_REDUCTIONS = frozenset(
    getattr(torch.ops.aten, name).default for name in ("sum", "mean", "amax", "amin", "prod")
) | {torch.ops.aten.sum.dim_IntList, torch.ops.aten.mean.dim, torch.ops.aten.var_mean.correction}


def _fuses_into(user: fx.Node) -> bool:
    """Whether a pointwise value read by ``user`` is computed inside ``user``'s kernel."""
    if _is_pointwise(user) or user.target in _REDUCTIONS:
        return True
    if is_storage_view(user):  # a view of it: look at who reads the view
        return all(_fuses_into(u) for u in user.users)
    return False


def owning_module(node: fx.Node, depth: int = 4) -> str:
    """``node``'s module, or that of the nearest user with one (a tangent, or a gradient sum
    AOTAutograd adds outside any module, belongs to the module that consumes it)."""
    frontier = [node]
    for _ in range(depth + 1):
        for candidate in frontier:
            path = module_path(candidate)
            if path:
                return path
        frontier = [user for candidate in frontier for user in candidate.users]
    return ""


def provenance_keys(joint: fx.GraphModule, renamed: dict[str, str]) -> dict[str, tuple]:
    """A name-independent key per joint-graph tensor, equal across two traces of one dynamo graph.

    Joint-graph names depend on how many aten ops came before, which differs once some linears
    are rewritten; the dynamo node a tensor came from does not (``renamed`` maps a rewritten
    node's name back to the original's). Among tensors from one dynamo node, (numel, dtype,
    ordinal) tells them apart (a layer norm's output vs its statistics).
    """
    keys: dict[str, tuple] = {}
    seen: dict[tuple, int] = defaultdict(int)
    for node in joint.graph.nodes:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or is_storage_view(node):
            continue
        source = node.name if node.op == "placeholder" else dynamo_origin(node)
        source = renamed.get(source, source)
        base = (source, size_hint(value.numel()), value.dtype)
        keys[node.name] = (*base, seen[base])
        seen[base] += 1
    return keys
