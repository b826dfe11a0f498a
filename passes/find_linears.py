"""Find the linear-like nodes of a dynamo graph whose weight is a parameter.

Why: these are the only places the WTA-CRS estimator applies (``dW = dYᵀX``), and each needs a
stable name so that decisions (a plan, include/exclude patterns, reports) survive graph breaks
and recompiles. Dynamo lifts parameters to placeholders whose ``grapharg.source`` spells the
attribute path (``L['self']._modules['encoder']._modules['layer']._modules['0']...``); we turn that
back into the parameter's FQN (``encoder.layer.0...``).

Matched forms (``W`` a 2-D parameter, possibly through ``.t()``):

* ``F.linear(x, W, b)`` — ``nn.Linear``;
* ``torch.addmm(b, x, W)`` — GPT-2's ``Conv1D`` (weight stored as ``(in, out)``);
* ``torch.mm(x, W)`` / ``torch.matmul(x, W)`` / ``x @ W``.

``bmm`` with a parameter operand is left alone: no transformer in scope uses one, and a batched
weight has no single ``dW = dYᵀX`` to sample.

Each match gets ``node.meta["wtacrs"] = LinearSite(...)``; nothing in the graph changes.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F

from wtacompile.config import WTAConfig
from wtacompile.report import SKIPPED, LinearSite

__all__ = ["find_linears", "parameter_fqn", "size_hint", "META_KEY"]

META_KEY = "wtacrs"

_LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
_MATMUL_TARGETS = {torch.mm, torch.matmul, operator.matmul}
_ROOT = re.compile(r"^L\['[^']*'\]")
_ITEM = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\[(\d+)\]|\[\'([^']*)\'\]")


def parameter_fqn(source_name: str) -> str:
    """``L['self']._modules['h']._modules['0']._parameters['weight']`` → ``h.0.weight``."""
    rest = _ROOT.sub("", source_name)
    rest = _ITEM.sub(lambda m: "." + next(g for g in m.groups() if g is not None), rest)
    return rest.lstrip(".")


def _parameter_of(node: fx.Node) -> tuple[str, torch.Tensor] | None:
    """(FQN, example value) if ``node`` is a parameter placeholder or ``.t()`` of one."""
    if node.op == "call_method" and node.target == "t" or (
        node.op == "call_function" and node.target in (torch.t, torch.Tensor.t)
    ):
        inner = _parameter_of(node.args[0])
        return None if inner is None else (inner[0] + ".T", inner[1])
    if node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    value = node.meta.get("example_value")
    if grapharg is None or value is None or value.dim() != 2:
        return None
    source = grapharg.source.name
    source = source() if callable(source) else source
    if "_parameters[" not in source:
        return None
    return parameter_fqn(source), value


def _match(node: fx.Node):
    """(op kind, x, weight node, is the weight node (in, out)?) for a linear-like node."""
    if node.op == "call_function" and node.target in _LINEAR_TARGETS:
        x, weight = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        return "linear", x, weight, False
    if node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3:
        if node.kwargs:  # beta/alpha scaling: not a plain linear
            return None
        return "addmm", node.args[1], node.args[2], True
    if node.op == "call_function" and node.target in _MATMUL_TARGETS and len(node.args) == 2:
        return ("mm" if node.target is torch.mm else "matmul"), node.args[0], node.args[1], True
    if node.op == "call_method" and node.target in ("matmul", "mm") and len(node.args) == 2:
        return node.target, node.args[0], node.args[1], True
    return None


def find_linears(gm: fx.GraphModule, config: WTAConfig) -> fx.GraphModule:
    """Annotate every linear-like node whose weight is a 2-D parameter with a :class:`LinearSite`."""
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        match = _match(node)
        if match is None:
            continue
        op, x, weight_node, weight_is_in_by_out = match
        if not isinstance(x, fx.Node) or not isinstance(weight_node, fx.Node):
            continue
        param = _parameter_of(weight_node)
        if param is None:
            continue
        fqn, weight = param
        fqn = fqn.removesuffix(".T")
        weight_value = weight_node.meta.get("example_value", weight)
        x_value = x.meta.get("example_value")
        if not isinstance(x_value, torch.Tensor) or x_value.dim() < 1:
            continue
        in_features, out_features = (
            (weight_value.shape[0], weight_value.shape[1]) if weight_is_in_by_out
            else (weight_value.shape[1], weight_value.shape[0])
        )
        if x_value.shape[-1] != in_features:
            continue
        # Two uses of one tied weight get distinct, stable keys.
        count = seen.get(fqn, 0)
        seen[fqn] = count + 1
        key = fqn if count == 0 else f"{fqn}#{count}"
        rows = size_hint(x_value.numel()) // max(size_hint(in_features), 1)
        node.meta[META_KEY] = LinearSite(
            node=node.name,
            weight=key,
            op=op,
            input_shape=tuple(size_hint(s) for s in x_value.shape),
            dtype=str(x_value.dtype).removeprefix("torch."),
            rows=rows,
            in_features=size_hint(in_features),
            out_features=size_hint(out_features),
            input_bytes=size_hint(x_value.numel()) * x_value.element_size(),
            weight_requires_grad=bool(weight.requires_grad),
            keep_ratio=config.ratio_for(fqn),
            verdict=SKIPPED,
        )
        node.meta[META_KEY + "_weight_layout"] = "in_out" if weight_is_in_by_out else "out_in"
    return gm


def size_hint(value) -> int:
    """A concrete int for a possibly symbolic size (its hint under dynamic shapes)."""
    if isinstance(value, torch.SymInt):
        env = value.node.shape_env
        hint = getattr(env, "optimization_hint", None) or env.size_hint  # renamed in torch 2.13
        return int(hint(value.node.expr))
    return int(value)
