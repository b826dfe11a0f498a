"""The dynamo/AOTAutograd internals we rely on (wtacompile._compat), and the passes that read them.

A torch upgrade that changes one of these should fail here first, with a plain message.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wtacompile import WTAConfig, _compat
from wtacompile.analysis.partition_trace import trace_partition
from wtacompile.ops import linear_with_sampled_grad
from wtacompile.passes import CompileState, find_linears, rewrite_sites


def capture(model, *args, inspect, dynamic=False):
    """``inspect(gm, example_inputs)`` on the first graph dynamo captures for ``model(*args)``.

    It runs inside the backend call: dynamo drops the placeholders' source metadata afterwards.
    """
    results = []

    def backend(gm, inputs):
        if not results:
            results.append(inspect(gm, inputs))
        return gm.forward

    torch.compile(model, backend=backend, dynamic=dynamic)(*args)
    return results[0]


class Forms(nn.Module):
    """One of each linear-like form find_linears matches, plus a tied weight and a buffer."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 12), nn.Linear(12, 8)])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 6, bias=False)})
        self.conv1d_weight = nn.Parameter(torch.randn(8, 5))  # (in, out), GPT-2's Conv1D
        self.conv1d_bias = nn.Parameter(torch.randn(5))
        self.proj = nn.Parameter(torch.randn(8, 7))  # (in, out), used as x @ W
        self.back = nn.Parameter(torch.randn(3, 8))  # (out, in), used as x @ W.t()
        self.frozen = nn.Parameter(torch.randn(4, 8), requires_grad=False)
        self.register_buffer("offset", torch.ones(8))

    def forward(self, x):
        h = self.blocks[1](self.blocks[0](x)) + self.offset
        tied = F.linear(h, self.heads["a"].weight)  # the second use of heads.a.weight
        return (self.heads["a"](h).sum(-1) + tied.sum(-1)
                + torch.addmm(self.conv1d_bias, h, self.conv1d_weight).sum(-1)
                + (h @ self.proj).sum(-1) + torch.matmul(h, self.back.t()).sum(-1)
                + F.linear(h, self.frozen).sum(-1))


def test_source_parameter_name_parses_dynamo_sources():
    source = "L['self']._modules['h']._modules['0']._modules['attn']._parameters['c_attn']"
    assert _compat.source_parameter_name(source) == "h.0.attn.c_attn"
    buffer = "L['self']._modules['h']._buffers['mask']"
    assert _compat.source_parameter_name(buffer) is None
    assert _compat.source_parameter_name(buffer, buffers=True) == "h.mask"
    assert _compat.source_parameter_name("L['x']") is None


def test_parameter_placeholders_name_every_parameter_and_buffer():
    model = Forms()
    found = capture(model, torch.randn(10, 8), inspect=lambda gm, _: {
        name: is_param for _, name, is_param in _compat.parameter_placeholders(gm)})
    expected = {name: True for name, _ in model.named_parameters()}
    expected["offset"] = False
    assert found == expected


def test_find_linears_matches_each_form_with_its_layout():
    config = WTAConfig(keep_ratio=0.5, exclude=("blocks.1.*",))
    state = capture(Forms(), torch.randn(10, 8),
                    inspect=lambda gm, _: find_linears(gm, CompileState(config)))
    got = {s.weight: (s.op, s.weight_layout, s.in_features, s.out_features, s.rows,
                      s.weight_requires_grad, s.requested_ratio) for s in state.sites}
    assert got == {
        "blocks.0.weight": ("linear", "out_in", 8, 12, 10, True, 0.5),
        "blocks.1.weight": ("linear", "out_in", 12, 8, 10, True, None),
        "heads.a.weight#1": ("linear", "out_in", 8, 6, 10, True, 0.5),
        "heads.a.weight": ("linear", "out_in", 8, 6, 10, True, 0.5),
        "conv1d_weight": ("addmm", "in_out", 8, 5, 10, True, 0.5),
        "proj": ("matmul", "in_out", 8, 7, 10, True, 0.5),
        "back": ("matmul", "in_out", 8, 3, 10, True, 0.5),
        "frozen": ("linear", "out_in", 8, 4, 10, False, 0.5),
    }
    # Graph order: the tied weight's first use in the graph keeps the plain name.
    assert [s.weight for s in state.sites][:3] == ["blocks.0.weight", "blocks.1.weight", "heads.a.weight"]
    assert {s.weight: s.skip_reason for s in state.sites}["frozen"].startswith("frozen weight")


def test_rewrite_puts_every_weight_in_linear_layout_and_keeps_forward_exact():
    torch.manual_seed(0)
    model = Forms()
    x = torch.randn(10, 8)
    gm, args, sites = capture(model, x, inspect=lambda gm, _: (
        gm, _graph_args(gm, model, x), find_linears(gm, CompileState(WTAConfig())).sites))
    expected = gm(*args)
    candidates = [s for s in sites if s.skip_reason is None]
    rewritten = rewrite_sites(gm, candidates, {s.weight: 0.5 for s in candidates}, WTAConfig())
    # One sample per input node: everything reads h but blocks.0 (reads x) and blocks.1.
    assert sorted(len(readers) for readers in rewritten.samples.values()) == [1, 1, 5]
    calls = [n for n in gm.graph.nodes if n.target is linear_with_sampled_grad]
    assert sorted(rewritten.renamed[n.name] for n in calls) == sorted(s.node for s in candidates)
    by_node = {s.node: s for s in candidates}
    for node in calls:
        site = by_node[rewritten.renamed[node.name]]
        weight = node.args[1].meta["example_value"]
        assert tuple(weight.shape) == (site.out_features, site.in_features), site.weight
    out = gm(*args)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _graph_args(gm, model, x):
    """The captured graph's positional inputs: the named parameters/buffers and the input."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    names = {node: name for node, name, _ in _compat.parameter_placeholders(gm)}
    return [state[names[n]] if n in names else x for n in gm.graph.find_nodes(op="placeholder")]


def test_joint_parameter_inputs_are_the_parameters_primals():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def inspect(gm, _):
        trace = trace_partition(gm, WTAConfig(inner="aot_eager"))
        return trace, _compat.joint_parameter_inputs(gm, trace.joint)

    trace, params = capture(model, torch.randn(4, 8), inspect=inspect)
    primals = _compat.primal_placeholders(trace.joint)
    assert len(params) == 4 and len(primals) == 5
    values = [n.meta["val"] for n in primals if n.name not in params]
    assert [tuple(v.shape) for v in values] == [(4, 8)]  # the one activation input


def test_size_hint_and_provenance_under_dynamic_shapes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))

    def inspect(gm, _):
        params = {node for node, _, _ in _compat.parameter_placeholders(gm)}
        values = [n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder") if n not in params]
        x = next(v for v in values if isinstance(v, torch.Tensor))  # dynamo's fake input
        sites = find_linears(gm, CompileState(WTAConfig())).sites
        return x, sites, trace_partition(gm, WTAConfig(inner="aot_eager"))

    x, sites, trace = capture(model, torch.randn(6, 8), dynamic=True, inspect=inspect)
    assert isinstance(x.shape[0], torch.SymInt) and _compat.size_hint(x.shape[0]) == 6
    assert [(s.rows, s.input_bytes) for s in sites] == [(6, 6 * 8 * 4), (6, 6 * 8 * 4)]
    origins = {_compat.dynamo_origin(n) for n in trace.joint.graph.nodes if n.op == "call_function"}
    assert {s.node for s in sites} <= origins


@pytest.mark.parametrize("op", [torch.ops.aten.view.default, torch.ops.aten.t.default,
                                torch.ops.aten._unsafe_view.default])
def test_views_resolve_to_their_storage(op):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2))
    v = graph.call_function(op, (y, [4, 2]) if op is not torch.ops.aten.t.default else (y,))
    assert _compat.is_storage_view(v) and _compat.storage_root(v) is y
    assert not _compat.is_storage_view(y) and _compat.storage_root(y) is y


def test_planning_capture_replays_side_effects_and_restores_dynamo():
    """``without_dynamo_debug_text`` drops debug text only: a side effect of the traced forward
    still happens, and dynamo's setting and function are back afterwards."""
    import torch._dynamo.symbolic_convert as symbolic_convert

    from wtacompile.planning.capture import capture_graphs

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.seen: list[int] = []

        def forward(self, x):
            self.seen.append(x.shape[0])  # a Python side effect dynamo replays after the graph
            self.calls = len(self.seen)
            return self.proj(x).sum()

    funcname = getattr(symbolic_convert, "get_funcname", None)
    policy = getattr(torch._dynamo.config, "side_effect_replay_policy", None)
    model = Recording()
    captured = capture_graphs(model, (torch.randn(3, 4),), None)
    assert captured.graphs and model.seen == [3] and model.calls == 1
    assert getattr(symbolic_convert, "get_funcname", None) is funcname
    assert getattr(torch._dynamo.config, "side_effect_replay_policy", None) == policy
