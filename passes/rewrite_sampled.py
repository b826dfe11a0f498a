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
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx

from wtacompile.config import WTAConfig
from wtacompile.ops import linear_with_sampled_grad, sample_input
from wtacompile.sites import LinearSite
from .compile_state import CompileState
from .find_linears import is_transpose

__all__ = ["Rewritten", "rewrite_sampled", "rewrite_sites"]

_SOURCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


@dataclass(frozen=True)
class Rewritten:
    """What :func:`rewrite_sites` did, by node name."""

    samples: dict[str, tuple[LinearSite, ...]]  # sample_input node -> the sites reading it
    renamed: dict[str, str]  # rewritten linear's new node -> the node it replaced


def rewrite_sampled(gm: fx.GraphModule, state: CompileState) -> CompileState:
    """The pass: rewrite the sites ``state.decisions`` sample, at their ratios."""
    rewrite_sites(gm, state.sites, state.ratios, state.config)
    return state


def rewrite_sites(gm: fx.GraphModule, sites: Iterable[LinearSite], ratios: Mapping[str, float],
                  config: WTAConfig) -> Rewritten:
    """Rewrite each site whose weight has a ratio in ``ratios``, one sample per input node."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    readers: dict[fx.Node, list[tuple[LinearSite, fx.Node]]] = {}
    for site in sites:
        if site.weight in ratios:
            node = nodes[site.node]
            readers.setdefault(_linear_operands(node, site)[0], []).append((site, node))
    samples: dict[str, tuple[LinearSite, ...]] = {}
    renamed: dict[str, str] = {}
    replaced_by: dict[fx.Node, fx.Node] = {}
    for x, members in readers.items():  # in graph order: a rewritten linear feeding x comes first
        x = replaced_by.get(x, x)
        ratio = max(ratios[site.weight] for site, _ in members)
        with graph.inserting_before(members[0][1]):  # x precedes every linear reading it
            sample = graph.call_function(sample_input, (x, ratio, config.method, config.min_rows))
            index = graph.call_function(operator.getitem, (sample, 0))
            x_saved = graph.call_function(operator.getitem, (sample, 1))
        # Where in the model the draw comes from (the first linear reading x). It also makes
        # AOTAutograd record provenance (from_node) for what it traces from these nodes.
        for new in (sample, index, x_saved):
            new.meta.update({key: members[0][1].meta[key] for key in _SOURCE_META if key in members[0][1].meta})
            new.meta["wtacompile"] = "row sample"
        for site, node in members:
            _, weight, bias = _linear_operands(node, site)
            with graph.inserting_before(node):
                weight = _to_out_in(graph, weight, site.weight_layout)
                replacement = graph.call_function(linear_with_sampled_grad, (x, weight, bias, index, x_saved))
            replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            renamed[replacement.name] = site.node
            replaced_by[node] = replacement
        samples[sample.name] = tuple(site for site, _ in members)
    graph.lint()
    gm.recompile()
    return Rewritten(samples, renamed)


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
