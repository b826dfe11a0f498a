r"""Order each draw after the first matmul that reads its input, so Inductor computes that input once.

A sampled input ``x`` has two kinds of forward readers: the matmuls of the linears reading it
(``Y = x Wᵀ``, Inductor's extern GEMM calls) and its draw — the row norms ``‖x_i‖``, the scores,
``sample_rows`` and the gather ``x[index]·scale``, all traced from one
:func:`wtacompile.ops.sample_input`. AOTAutograd traces the draw first (the sampled linear takes
its ``index`` as an argument), and the partitioner keeps that order.

Inductor lowers nodes in graph order and keeps a pointwise result *unrealized* — an expression,
not a buffer — until a reader needs a buffer. A GEMM does; a reduction does not, it inlines the
expression. So where ``x`` is a pointwise result (``gelu(h)`` before BERT's and GPT-2's
down-projection, ``silu(g)·u`` before Llama's, ``relu(h)`` in T5) the norms, lowered first,
recompute ``x`` from ``h`` inside their reduction, the GEMM then writes ``x`` once more into a
buffer, and the gather recomputes it a third time on the kept rows:

.. math::  \text{cost}(x) ≈ (1 + 1 + r) · N·F \text{ activation evaluations, against } N·F \text{ dense.}

On a CPU an ``erf`` per element is not cheap: for the MiniLM-shaped BERT of the frontier
benchmark the second GELU alone was 69 ms of a 2574 ms sampled step (``torch.profiler``).
Moving the draw's nodes to just after the first GEMM reading ``x`` makes that GEMM realise ``x``
first; the norms and the gather then read the buffer (and Inductor's scheduler may fuse the
norms into the kernel that writes it). Nothing else changes: the draw depends on no GEMM output,
the GEMM on no part of the draw, and every moved node keeps its order among the moved ones.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from wtacompile._compat import dynamo_origin, is_storage_view
from wtacompile.lower import sampled_storage

__all__ = ["draw_after_first_matmul"]

_aten = torch.ops.aten
#: Readers Inductor lowers to an extern kernel, which needs its inputs in buffers.
_REALISING = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default})


def draw_after_first_matmul(graph: fx.Graph) -> int:
    """Move every draw's nodes (see the module docstring) to just after the first GEMM reading the
    sampled input, where that GEMM comes later; returns how many draws moved.

    A node is part of a draw if it was traced from the same dynamo-graph node as the draw's
    ``sample_rows`` (views aside: they cost nothing and may be shared with the GEMM), or reads
    such a node and comes before the GEMM. A draw whose nodes the GEMM depends on stays put.
    """
    draws = graph.find_nodes(op="call_function", target=torch.ops.wtacompile.sample_rows.default)
    if not draws:
        return 0
    # One pass over the graph, not one per draw: a whole model's forward holds thousands of nodes
    # and a draw per sampled input of every layer.
    by_origin: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and not is_storage_view(node):
            by_origin[dynamo_origin(node)].append(node)
    moved = 0
    for draw in draws:
        origin = dynamo_origin(draw)
        gemm = _first_realising_reader(sampled_storage(draw)) if origin is not None else None
        if gemm is None:
            continue
        own = set(by_origin[origin])
        moving, moving_set, node = [], set(), by_origin[origin][0]
        while node is not gemm and node.op != "root":  # to the GEMM, or past the end if it came first
            if node in own or not moving_set.isdisjoint(node.all_input_nodes):
                moving.append(node)
                moving_set.add(node)
            node = node.next
        if node is not gemm or not moving or not moving_set.isdisjoint(gemm.all_input_nodes):
            continue
        anchor = gemm
        for node in moving:
            anchor.append(node)
            anchor = node
        moved += 1
    if moved:
        graph.lint()
    return moved


def _first_realising_reader(root: fx.Node) -> fx.Node | None:
    """The first node in graph order that reads ``root``'s storage (through views) as a GEMM
    operand; ``None`` if none does."""
    readers, frontier = set(), [root]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if is_storage_view(user):
                frontier.append(user)
            elif user.op == "call_function" and user.target in _REALISING:
                readers.add(user)
    node = root
    while readers and node.op != "root":  # readers come after root: walk on from it
        if node in readers:
            return node
        node = node.next
    return None
