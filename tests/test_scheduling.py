"""Draws are ordered after the first matmul reading their input (wtacompile.scheduling)."""

import copy

import pytest
import torch

import wtacompile.scheduling as scheduling
from hf_models import PreNormMLP, build
from wtacompile._compat import is_storage_view, storage_root
from wtacompile.lower import sampled_storage

_GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def _first_reader(root):
    """The first node in graph order reading ``root``'s storage other than through a view."""
    readers, frontier = [], [root]
    while frontier:
        for user in frontier.pop().users:
            (frontier if is_storage_view(user) else readers).append(user)
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return min(readers, key=order.__getitem__)


def _compile_and_step(model, args, options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="wtacrs", options=options)
    torch.manual_seed(1)
    out = compiled(**args) if isinstance(args, dict) else compiled(args)
    loss = out.loss if hasattr(out, "loss") else out.square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["mlp", "llama"])
def test_each_sampled_input_is_read_first_by_a_matmul_and_nothing_changes(family, monkeypatch):
    """In every partitioned forward graph each sampled input's first reader is a linear's GEMM
    (which makes Inductor write it to a buffer that the norms and the gather then read, instead
    of recomputing a GELU/SiLU product twice more), and the step is bit-identical to the
    graph order AOTAutograd traced: same loss, same gradients, same draw."""
    if family == "mlp":
        torch.manual_seed(0)
        model = torch.nn.Sequential(PreNormMLP(), PreNormMLP())
        args = torch.randn(512, 64).abs()
    else:
        model, args = build("llama")
    options = {"keep_ratio": 0.3, "inner": "aot_eager"}
    graphs, original = [], scheduling.draw_after_first_matmul

    def spy(graph):
        moved = original(graph)
        graphs.append((graph, moved))
        return moved

    monkeypatch.setattr(scheduling, "draw_after_first_matmul", spy)
    loss, grads = _compile_and_step(copy.deepcopy(model), args, options)
    assert graphs and sum(moved for _, moved in graphs) > 0  # the analysis's partitions and the compile's
    for forward, _ in graphs:
        draws = forward.find_nodes(op="call_function", target=torch.ops.wtacompile.sample_rows.default)
        assert draws
        for draw in draws:
            first = _first_reader(storage_root(sampled_storage(draw)))
            assert first.target in _GEMMS, (draw, first)

    monkeypatch.setattr(scheduling, "draw_after_first_matmul", lambda graph: 0)
    traced_loss, traced_grads = _compile_and_step(copy.deepcopy(model), args, options)
    assert torch.equal(loss, traced_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, traced_grads[name]), name


def test_a_draw_the_matmul_depends_on_stays_put():
    """A draw whose nodes feed the GEMM (not a sampled linear's shape, but possible in a graph a
    user built) is not moved: moving it would break the graph."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    w = graph.placeholder("w")
    norms = graph.call_function(torch.ops.aten.linalg_vector_norm.default, (x, 2, [1]))
    draw = graph.call_function(torch.ops.wtacompile.sample_rows.default, (norms, 4, "wtacrs"))
    total = graph.call_function(torch.ops.aten.sum.default, (norms,))
    scaled_w = graph.call_function(torch.ops.aten.mul.Tensor, (w, total))
    gemm = graph.call_function(torch.ops.aten.mm.default, (x, scaled_w))
    graph.output((gemm, draw))
    for node in (norms, draw):
        node.meta["from_node"] = [type("Origin", (), {"name": "sample_input"})()]
    before = [n.name for n in graph.nodes]
    assert scheduling.draw_after_first_matmul(graph) == 0
    assert [n.name for n in graph.nodes] == before
