"""Rewrite the chosen linear-like nodes into sampled-gradient linears, one sample per input.

Why: this is where memory is actually saved. For every input ``x`` that chosen linears read
(q/k/v read one; most linears are alone) the graph gets one draw::

    sample = wtacompile.ops.sample_input(x, keep_ratio, method, min_rows)   # (index, x_saved)

and each of those linears becomes ``linear_with_sampled_grad(x, W, b, index, x_saved)``: the same
forward matmul, whose weight gradient reads the shared compact rows. Sharing matters: three
linears each with their own copy at keep 0.3 would keep 0.9 of an input they share; one copy
keeps 0.3. Linears sharing an input are sampled at the largest ratio asked of any of them.
addmm/matmul forms with an ``(in, out)`` weight get an explicit ``W.t()`` so every rewritten node
has the ``F.linear`` layout; the forward value is unchanged, so the node's meta carries over.

Only the dynamo-level graph is touched. AOTAutograd traces the sampling op and the autograd
function into the joint graph; the partitioner sees that backward needs the compact rows and
indices, not ``x``.

Under ``row_scores="gradient"`` (:mod:`wtacompile.grad_predictor`) the graph also gets each row's
cell — one ``(N,)`` tensor per row layout, shared by every sample with that layout, built from
the graph's ``attention_mask``/``labels`` inputs where they have one entry per row — and one
extra placeholder per sampled weight, after dynamo's, for that weight's learned state:
:func:`wtacompile.lower.compile_graph` passes the tensors (``gm.meta[SAMPLER_STATES]``) on every
call; backward returns what it observed as their gradients, which each state folds in
(:func:`wtacompile.grad_predictor.learning_state`). So a graph this pass rewrote is run through
``compile_graph``, not called as it is. (Placeholders are added to a copy of the graph that
``gm`` then owns: dynamo reads its own graph's placeholders after the backend returns.)
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from wtacompile import grad_predictor
from wtacompile.config import WTAConfig
from wtacompile.ops import linear_with_sampled_grad, sample_input
from wtacompile.sites import LinearSite
from .compile_state import CompileState
from .find_linears import is_transpose

__all__ = ["ROWS_IN_BACKWARD", "SAMPLER_STATE", "SAMPLER_STATES", "Rewritten", "StateProvider", "StateSlot", "fresh_states",
           "graph_row_cells", "rewrite_sampled", "rewrite_sites"]

_SOURCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack")
SAMPLER_STATE = "sampler state"  # node.meta["wtacompile"] of a state placeholder
SAMPLER_STATES = "wtacompile_sampler_states"  # gm.meta key: the state tensors, in placeholder order
#: node.meta key on a sample's compact rows that forward need not produce: their input stays saved
#: for another op's backward anyway, so :func:`wtacompile.lower.expose_samples` exposes only the
#: indices and the partitioner gathers the rows in backward (no compact copy is saved).
ROWS_IN_BACKWARD = "wtacompile_rows_in_backward"
# The model's own inputs (``model(attention_mask=...)``, as dynamo names them), not a decoder's or
# an encoder's mask under another name.
_ROW_INPUTS = {"attention_mask": re.compile(r"^l_(?:kwargs_)?attention_mask_$", re.IGNORECASE),
               "labels": re.compile(r"^l_(?:kwargs_)?labels_$", re.IGNORECASE)}
_FLATTENING = {"view", "reshape", "flatten", torch.reshape, torch.flatten}


@dataclass(frozen=True)
class StateSlot:
    """One sampler-state placeholder: the tensor it was compiled with, and which graph input is
    the weight whose state it is (``None``: the weight is not an input; the tensor is its own).
    At each call the state is looked up from that input, so a graph dynamo reuses for another
    model instance of the same class learns into that model's states."""

    tensor: torch.Tensor
    weight_input: int | None


# (gm, site, weight node) -> the slot for that site's weight
StateProvider = Callable[[fx.GraphModule, LinearSite, fx.Node], StateSlot]


@dataclass(frozen=True)
class Rewritten:
    """What :func:`rewrite_sites` did, by node name."""

    samples: dict[str, tuple[LinearSite, ...]]  # sample_input node -> the sites reading it
    renamed: dict[str, str]  # rewritten linear's new node -> the node it replaced


def rewrite_sampled(gm: fx.GraphModule, state: CompileState) -> CompileState:
    """The pass: rewrite the sites ``state.decisions`` sample, at their ratios."""
    rewrite_sites(gm, state.sites, state.ratios, state.config, _registered_states(state.example_inputs),
                  state.rows_in_backward)
    return state


def _registered_states(example_inputs) -> StateProvider:
    """States from :func:`wtacompile.grad_predictor.state_for`, keyed by the real weight tensor
    (the example input behind the weight's placeholder), so they outlive this compile."""
    def provide(gm: fx.GraphModule, site: LinearSite, weight: fx.Node) -> StateSlot:
        root = _weight_root(weight)
        position = gm.graph.find_nodes(op="placeholder").index(root) if root.op == "placeholder" else None
        if position is not None and position < len(example_inputs):
            return StateSlot(grad_predictor.state_for(example_inputs[position]), position)
        if root.op == "get_attr":  # a parameter dynamo kept as an attribute of the graph
            try:
                return StateSlot(grad_predictor.state_for(gm.get_parameter(root.target)), None)
            except AttributeError:  # not a parameter
                pass
        return StateSlot(grad_predictor.graph_owned_state(_device_of(weight)), None)  # computed weight
    return provide


def fresh_states(gm: fx.GraphModule, site: LinearSite, weight: fx.Node) -> StateSlot:
    """A :data:`StateProvider` for traces made only to analyse: new states, registered nowhere."""
    # Requires grad like the real states, so the trace is the graph the real compile partitions.
    return StateSlot(grad_predictor.new_state(_device_of(weight)).requires_grad_(), None)


def _weight_root(weight: fx.Node) -> fx.Node:
    """The weight's own node: ``W`` for a ``W.t()`` an ``(in, out)`` matmul reads."""
    return weight.args[0] if is_transpose(weight) else weight


def _device_of(node: fx.Node) -> torch.device:
    value = node.meta.get("example_value")
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def rewrite_sites(gm: fx.GraphModule, sites: Iterable[LinearSite], ratios: Mapping[str, float],
                  config: WTAConfig, states: StateProvider | None = None,
                  rows_in_backward: frozenset[str] = frozenset(), nonfinite_marker: bool = True) -> Rewritten:
    """Rewrite each site whose weight has a ratio in ``ratios``, one sample per input node.

    ``states`` gives each sampled weight's :mod:`~wtacompile.grad_predictor` state under
    ``config.row_scores == "gradient"`` (``None``: norm-only scores whatever the config).
    The samples of the weights in ``rows_in_backward`` leave their compact rows to backward
    (:data:`ROWS_IN_BACKWARD`). ``nonfinite_marker=False``: for a graph traced only to read what
    its partition saves (see :func:`~wtacompile.ops.linear_with_sampled_grad`).
    """
    learning = states is not None and config.row_scores == "gradient" and bool(ratios)
    if learning:
        _own_graph(gm)  # before any node is looked up: the rewrite works on the copy
    graph = gm.graph
    row_inputs = _row_inputs(graph) if learning else {}
    cells_by_layout: dict[tuple, fx.Node] = {}
    state_nodes: dict[fx.Node, fx.Node] = {}  # weight -> its state: one however many linears it serves
    nodes = {n.name: n for n in graph.nodes}
    readers: dict[object, list[tuple[LinearSite, fx.Node]]] = {}
    first_x: dict[object, fx.Node] = {}
    for site in sites:
        if site.weight in ratios:
            node = nodes[site.node]
            x = _linear_operands(node, site)[0]
            key = _value_key(x)
            first_x.setdefault(key, x)
            readers.setdefault(key, []).append((site, node))
    samples: dict[str, tuple[LinearSite, ...]] = {}
    renamed: dict[str, str] = {}
    replaced_by: dict[fx.Node, fx.Node] = {}
    for key, members in readers.items():  # in graph order: a rewritten linear feeding x comes first
        x = replaced_by.get(first_x[key], first_x[key])
        ratio = max(ratios[site.weight] for site, _ in members)
        cells, member_states = None, {}
        # Rows of a (B, D) input (a pooler, a classifier head) are all one cell: nothing to learn.
        # (Nor is the index of the one cell a constant that Inductor's CPU scatter can vectorise.)
        layout = _row_layout(x)
        if learning and layout is not None and not statically_known_true(
                layout.meta["example_value"].shape[1] == 1):
            for site, node in members:
                weight = _weight_root(_linear_operands(node, site)[1])
                if weight not in state_nodes:
                    state_nodes[weight] = _state_placeholder(gm, states(gm, site, weight))
                member_states[site.weight] = state_nodes[weight]
            cells = _cells_node(graph, x, layout, members[0][1], row_inputs, cells_by_layout)
        with graph.inserting_before(members[0][1]):  # x precedes every linear reading it
            sample = graph.call_function(sample_input, (x, ratio, config.method, config.min_rows, cells,
                                                        tuple(dict.fromkeys(member_states.values()))))
            index = graph.call_function(operator.getitem, (sample, 0))
            x_saved = graph.call_function(operator.getitem, (sample, 1))
        # Where in the model the draw comes from (the first linear reading x). It also makes
        # AOTAutograd record provenance (from_node) for what it traces from these nodes.
        for new in (sample, index, x_saved):
            new.meta.update({key: members[0][1].meta[key] for key in _SOURCE_META if key in members[0][1].meta})
            new.meta["wtacompile"] = "row sample"
        if all(site.weight in rows_in_backward for site, _ in members):
            x_saved.meta[ROWS_IN_BACKWARD] = True
        for site, node in members:
            _, weight, bias = _linear_operands(node, site)
            with graph.inserting_before(node):
                weight = _to_out_in(graph, weight, site.weight_layout)
                replacement = graph.call_function(linear_with_sampled_grad, (
                    x, weight, bias, index, x_saved, cells, member_states.get(site.weight)),
                    {} if nonfinite_marker else {"nonfinite_marker": False})
            replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            renamed[replacement.name] = site.node
            replaced_by[node] = replacement
        samples[sample.name] = tuple(site for site, _ in members)
    graph.lint()
    gm.recompile()
    return Rewritten(samples, renamed)


#: Tensor methods that make a new tensor of the same values from their receiver and constants: two
#: calls with the same receiver and arguments are one value (AOTAutograd's CSE merges them).
_VALUE_COPIES = {"to", "float", "half", "bfloat16", "double", "type", "contiguous"}


def _value_key(x: object) -> object:
    """What identifies ``x``'s value for sharing a sample: the node itself, or, for a cast of a
    value (PEFT casts a LoRA adapter's input to its weights' dtype, once per adapter), the cast
    and its receiver's key. Two adapters beside q and v then share one draw of their one input;
    each would otherwise draw its own, and the traced graph would merge their row norms."""
    if (isinstance(x, fx.Node) and x.op == "call_method" and x.target in _VALUE_COPIES and x.args
            and isinstance(x.args[0], fx.Node) and not _mutated(x.args[0])
            and not any(isinstance(a, fx.Node) for a in (*x.args[1:], *x.kwargs.values()))):
        return (x.target, _value_key(x.args[0]), tuple(map(repr, x.args[1:])),
                tuple(sorted((k, repr(v)) for k, v in x.kwargs.items())))
    return x


def _mutated(node: fx.Node) -> bool:
    """Whether an in-place op writes ``node`` (two casts of it may then differ)."""
    return any((user.op == "call_method" and str(user.target).endswith("_")) or (
        user.op == "call_function" and getattr(user.target, "__name__", "").endswith("_")
        and user.args and user.args[0] is node) for user in node.users)


def _row_inputs(graph: fx.Graph) -> dict[str, fx.Node]:
    """The graph's ``attention_mask`` and ``labels`` inputs (2-D tensors), by role."""
    found = {}
    for node in graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        # 0/1 (or bool) masks and integer labels; an additive float mask means the opposite.
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.is_floating_point():
            continue
        for role, pattern in _ROW_INPUTS.items():
            if role not in found and pattern.search(node.name):
                found[role] = node
    return found


def _row_layout(x: fx.Node) -> fx.Node | None:
    """The ``(B, T, D)`` tensor whose rows ``x`` has in order: ``x`` itself, or what a flattening
    ``x`` was made from (not, say, a ``(T, B, D)`` one); ``None`` if neither."""
    if x.meta["example_value"].dim() == 3:
        return x
    if (x.meta["example_value"].dim() == 2 and x.op in ("call_method", "call_function")
            and x.target in _FLATTENING and isinstance(x.args[0], fx.Node)):
        source = x.args[0].meta.get("example_value")
        if isinstance(source, torch.Tensor) and source.dim() == 3:
            return x.args[0]
    return None


def _cells_node(graph: fx.Graph, x: fx.Node, layout: fx.Node, first_reader: fx.Node,
                row_inputs: Mapping[str, fx.Node], cache: dict[tuple, fx.Node]) -> fx.Node:
    """The node computing each row's cell for ``x`` (rows laid out as ``layout``'s, see
    :func:`_row_layout`), shared by every ``x`` of the same layout."""
    value = x.meta["example_value"]
    batch_seq = tuple(layout.meta["example_value"].shape[:2])
    matching = {role: node for role, node in row_inputs.items() if all(
        statically_known_true(a == b) for a, b in zip(batch_seq, node.meta["example_value"].shape))}
    mask, labels = matching.get("attention_mask"), matching.get("labels")
    key = (str(value.numel() // value.shape[-1]), tuple(map(str, batch_seq)), mask, labels)
    if key not in cache:
        with graph.inserting_before(first_reader):
            cache[key] = graph.call_function(graph_row_cells, (x, layout, mask, labels))
        cache[key].meta.update({k: first_reader.meta[k] for k in _SOURCE_META if k in first_reader.meta})
        cache[key].meta["wtacompile"] = "row cells"
    return cache[key]


def graph_row_cells(x: torch.Tensor, layout: torch.Tensor, attention_mask: torch.Tensor | None,
                    labels: torch.Tensor | None) -> torch.Tensor:
    """:func:`wtacompile.grad_predictor.row_cells` for the rows of ``x``: positions along dim 1 of
    ``layout`` (``(B, T, D)``, rows in ``x``'s order)."""
    return grad_predictor.row_cells(x.numel() // x.shape[-1], layout.shape[1], x.device, attention_mask, labels)


def _state_placeholder(gm: fx.GraphModule, slot: StateSlot) -> fx.Node:
    """A new placeholder, after every other, for ``slot`` (recorded in ``gm.meta``)."""
    graph = gm.graph
    slots = gm.meta.setdefault(SAMPLER_STATES, [])
    tensor = slot.tensor
    placeholders = graph.find_nodes(op="placeholder")
    with graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(f"wtacrs_sampler_state_{len(slots)}")
    fake_mode = torch._guards.detect_fake_mode(
        [p.meta.get("example_value") for p in placeholders if isinstance(p.meta.get("example_value"), torch.Tensor)])
    node.meta["example_value"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
    node.meta["wtacompile"] = SAMPLER_STATE
    # AOTAutograd maps dynamo's placeholders to sources; one with none is an input dynamo did
    # not guard (as DDP's split graphs have).
    node._dynamo_source = None
    slots.append(slot)
    return node


def _own_graph(gm: fx.GraphModule) -> None:
    """Give ``gm`` a copy of its graph (same node names, meta and placeholder sources), so that
    new placeholders do not reach the graph dynamo still reads."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    gm.graph = graph


def _linear_operands(node: fx.Node, site: LinearSite):
    if site.op == "addmm":
        bias, x, weight = node.args
        return x, weight, bias
    x, weight = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    if site.op != "linear":  # mm / matmul: no bias operand
        return x, weight, None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, weight, bias


def _to_out_in(graph: fx.Graph, weight: fx.Node, layout: str) -> fx.Node:
    """A node for the weight in ``(out, in)`` layout."""
    if layout == "out_in":
        return weight
    if is_transpose(weight):  # W.t() used as (in, out): W itself is (out, in)
        return weight.args[0]
    transposed = graph.call_function(torch.t, (weight,))
    value = weight.meta.get("example_value")
    if value is not None:
        transposed.meta["example_value"] = value.t()
    return transposed
