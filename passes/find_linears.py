"""Find the linear-like nodes of a dynamo graph whose weight is a parameter.

Why: these are the only places the WTA-CRS estimator applies (``dW = dYᵀX``), and each needs a
stable name so that decisions (a plan, include/exclude patterns, reports) survive graph breaks
and recompiles. Dynamo lifts parameters to placeholders whose source spells the attribute path;
we turn that back into the parameter's FQN (:func:`wtacompile._compat.source_parameter_name`).

Matched forms (``W`` a 2-D parameter, possibly through ``.t()``):

* ``F.linear(x, W, b)`` — ``nn.Linear``;
* ``torch.addmm(b, x, W)`` — GPT-2's ``Conv1D`` (weight stored as ``(in, out)``);
* ``torch.mm(x, W)`` / ``torch.matmul(x, W)`` / ``x @ W``.

Linears inside activation-checkpointed regions are recorded too, marked ``checkpointed``: their
inputs are recomputed rather than saved, so they are reported (and warned about) but not sampled.

``bmm`` with a parameter operand is left alone: no transformer in scope uses one, and a batched
weight has no single ``dW = dYᵀX`` to sample.

Returns the state with ``sites``: one frozen :class:`~wtacompile.sites.LinearSite` per match, in
graph order. Nothing in the graph changes.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from wtacompile._compat import placeholder_example, placeholder_source, size_hint, source_parameter_name
from wtacompile.sites import LinearSite
from .compile_state import CompileState

__all__ = ["find_linears", "is_transpose", "match_linear"]

_LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
_MATMUL_TARGETS = {torch.mm, torch.matmul, operator.matmul}
_CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


def find_linears(gm: fx.GraphModule, state: CompileState) -> CompileState:
    """Record a :class:`LinearSite` for every linear-like node whose weight is a 2-D parameter."""
    sites: list[LinearSite] = []
    uses: dict[str, int] = {}
    for node, outer, checkpointed in _graph_and_checkpointed_nodes(gm):
        match = match_linear(node)
        if match is None:
            continue
        op, x, weight_node, layout = match
        param = _parameter_of(weight_node, outer) if isinstance(weight_node, fx.Node) else None
        x_value = x.meta.get("example_value") if isinstance(x, fx.Node) else None
        if param is None or not isinstance(x_value, torch.Tensor) or x_value.dim() < 1:
            continue
        fqn, weight, placeholder = param
        # The model's own name where the backend knows the model: dynamo's source spells the
        # access path, which differs under wrappers that override __getattr__ (PEFT's
        # ``__dict__['_modules']``) and after a graph break inside a submodule.
        fqn = state.parameter_names.get(id(placeholder_example(placeholder)), fqn)
        shape = weight_node.meta.get("example_value", weight).shape
        in_features, out_features = (shape[0], shape[1]) if layout == "in_out" else (shape[1], shape[0])
        if x_value.shape[-1] != in_features:
            continue
        # Two uses of one tied weight get distinct, stable keys.
        count = uses.get(fqn, 0)
        uses[fqn] = count + 1
        numel = size_hint(x_value.numel())
        sites.append(LinearSite(
            node=node.name,
            weight=fqn if count == 0 else f"{fqn}#{count}",
            op=op,
            weight_layout=layout,
            input_shape=tuple(size_hint(s) for s in x_value.shape),
            dtype=str(x_value.dtype).removeprefix("torch."),
            itemsize=x_value.element_size(),
            rows=numel // max(size_hint(in_features), 1),
            in_features=size_hint(in_features),
            out_features=size_hint(out_features),
            input_bytes=numel * x_value.element_size(),
            weight_requires_grad=bool(weight.requires_grad),
            requested_ratio=state.config.ratio_for(fqn, state.parameter_aliases.get(fqn, ())),
            dynamic_rows=isinstance(x_value.numel(), torch.SymInt),
            checkpointed=checkpointed,
        ))
    return dataclasses.replace(state, sites=tuple(sites))


def match_linear(node: fx.Node) -> tuple[str, object, object, str] | None:
    """(op kind, x, weight operand, weight layout) if ``node`` is linear-like, else ``None``.

    The layout is ``"out_in"`` for ``F.linear``'s ``(out, in)`` weight, ``"in_out"`` for ``x @ W``.
    """
    if node.op == "call_function" and node.target in _LINEAR_TARGETS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        return "linear", node.args[0], weight, "out_in"
    if node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3:
        if node.kwargs:  # beta/alpha scaling: not a plain linear
            return None
        return "addmm", node.args[1], node.args[2], "in_out"
    if node.op == "call_function" and node.target in _MATMUL_TARGETS and len(node.args) == 2:
        return ("mm" if node.target is torch.mm else "matmul"), node.args[0], node.args[1], "in_out"
    if node.op == "call_method" and node.target in ("matmul", "mm") and len(node.args) == 2:
        return node.target, node.args[0], node.args[1], "in_out"
    return None


def is_transpose(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "t") or (
        node.op == "call_function" and node.target in (torch.t, torch.Tensor.t)
    )


def _graph_and_checkpointed_nodes(gm: fx.GraphModule):
    """``(node, outer, checkpointed)`` for the graph's nodes, then for those of each activation-
    checkpointed region (``tag_activation_checkpoint``: ``torch.utils.checkpoint``, and Hugging
    Face's ``gradient_checkpointing_enable``). ``outer`` maps a region's placeholder to the
    operand the region was called with, so its weights resolve to parameters."""
    for node in gm.graph.nodes:
        yield node, (lambda n: n), False
    for node in gm.graph.find_nodes(op="call_function", target=_CHECKPOINT):
        body_node = node.args[0]
        if not (isinstance(body_node, fx.Node) and body_node.op == "get_attr"):
            continue
        body = getattr(gm, body_node.target)
        operands = dict(zip(body.graph.find_nodes(op="placeholder"), node.args[1:]))
        for inner in body.graph.nodes:
            yield inner, (lambda n, operands=operands: operands.get(n, n)), True


def _parameter_of(node: fx.Node, outer=lambda n: n) -> tuple[str, torch.Tensor, fx.Node] | None:
    """(FQN from its source, example value, placeholder) if ``node`` is a 2-D parameter
    placeholder or ``.t()`` of one."""
    node = outer(node)
    if not isinstance(node, fx.Node):
        return None
    if is_transpose(node):
        return _parameter_of(node.args[0], outer) if isinstance(node.args[0], fx.Node) else None
    source = placeholder_source(node)
    value = node.meta.get("example_value")
    if source is None or not isinstance(value, torch.Tensor) or value.dim() != 2:
        return None
    name = source_parameter_name(source)
    return None if name is None else (name, value, node)
