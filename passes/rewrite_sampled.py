"""Rewrite the chosen linear-like nodes into the sampled-save linear.

Why: this is where memory is actually saved. Each node whose :class:`LinearSite` says
``sampled=True`` becomes ``wtacompile.sampled_linear(x, W, b, keep_ratio=r, ...)``; addmm/matmul
forms with an ``(in, out)`` weight get an explicit ``W.t()`` so every rewritten node has the
``F.linear`` layout. The forward value is unchanged (same shapes, same kernel), so the node's
``example_value`` and provenance meta carry over as they are.

Only the dynamo-level graph is touched. AOTAutograd then traces the op's registered autograd
formula into the joint graph, and the partitioner sees that backward needs only the compact rows
and indices, not ``x``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from wtacompile.config import WTAConfig
from wtacompile.ops import sampled_linear
from .find_linears import META_KEY

__all__ = ["rewrite_sampled"]


def rewrite_sampled(gm: fx.GraphModule, config: WTAConfig) -> fx.GraphModule:
    """Replace every site marked ``sampled`` with :func:`wtacompile.sampled_linear`."""
    graph = gm.graph
    for node in list(graph.nodes):
        site = node.meta.get(META_KEY)
        if site is None or not site.sampled:
            continue
        x, weight, bias = _linear_operands(node)
        layout = node.meta[META_KEY + "_weight_layout"]
        with graph.inserting_before(node):
            weight = _to_out_in(graph, weight, layout)
            replacement = graph.call_function(
                sampled_linear,
                (x, weight, bias),
                {"keep_ratio": site.keep_ratio, "method": config.method, "min_rows": config.min_rows},
            )
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _linear_operands(node: fx.Node):
    if node.op == "call_function" and node.target is torch.addmm:
        bias, x, weight = node.args
        return x, weight, bias
    x, weight = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    if node.meta[META_KEY].op != "linear":  # mm / matmul: no bias operand
        return x, weight, None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, weight, bias


def _to_out_in(graph: fx.Graph, weight: fx.Node, layout: str) -> fx.Node:
    """A node for the weight in ``(out, in)`` layout."""
    is_transpose = (weight.op == "call_method" and weight.target == "t") or (
        weight.op == "call_function" and weight.target in (torch.t, torch.Tensor.t)
    )
    if layout == "out_in":
        return weight
    if is_transpose:  # W.t() used as (in, out): W itself is (out, in)
        return weight.args[0]
    transposed = graph.call_function(torch.t, (weight,))
    value = weight.meta.get("example_value")
    if value is not None:
        transposed.meta["example_value"] = value.t()
    return transposed
