"""Rewrite the chosen linear-like nodes into the sampled-save linear.

Why: this is where memory is actually saved. Each site the decisions sample becomes
``wtacompile.sampled_linear(x, W, b, keep_ratio=r, ...)``; addmm/matmul forms with an ``(in, out)``
weight get an explicit ``W.t()`` so every rewritten node has the ``F.linear`` layout. The forward
value is unchanged (same shapes, same kernel), so the node's ``example_value`` and provenance
meta carry over as they are.

Only the dynamo-level graph is touched. AOTAutograd then traces the op's registered autograd
formula into the joint graph, and the partitioner sees that backward needs only the compact rows
and indices, not ``x``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx

from wtacompile.config import WTAConfig
from wtacompile.ops import sampled_linear
from wtacompile.sites import LinearSite
from .compile_state import CompileState
from .find_linears import is_transpose

__all__ = ["rewrite_sampled", "rewrite_sites"]


def rewrite_sampled(gm: fx.GraphModule, state: CompileState) -> CompileState:
    """The pass: rewrite the sites ``state.decisions`` sample, at their ratios."""
    rewrite_sites(gm, state.sites, state.ratios, state.config)
    return state


def rewrite_sites(gm: fx.GraphModule, sites: Iterable[LinearSite], ratios: Mapping[str, float],
                  config: WTAConfig) -> dict[str, LinearSite]:
    """Replace each site whose weight has a ratio in ``ratios`` with :func:`sampled_linear`.

    Returns ``{name of the new node: site}`` (the rewrite gives the nodes new names).
    """
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    replaced: dict[str, LinearSite] = {}
    for site in sites:
        if site.weight not in ratios:
            continue
        node = nodes[site.node]
        x, weight, bias = _linear_operands(node, site)
        with graph.inserting_before(node):
            weight = _to_out_in(graph, weight, site.weight_layout)
            replacement = graph.call_function(
                sampled_linear,
                (x, weight, bias),
                {"keep_ratio": ratios[site.weight], "method": config.method, "min_rows": config.min_rows},
            )
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        replaced[replacement.name] = site
    graph.lint()
    gm.recompile()
    return replaced


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
