"""The wtacrs backend: registration, options, decisions, caching, recompute safety, statistics."""

import copy
import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import wtacompile
from wtacompile import SavedTensorMeter, WTAConfig

AOT = {"inner": "aot_eager"}


class MLP(nn.Module):
    """Linear → LayerNorm → Linear → GELU → Linear: the sampled inputs are the LN/GELU outputs."""

    def __init__(self, d=16, h=32, out=8):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.mid = nn.Linear(h, h)
        self.down = nn.Linear(h, out)

    def forward(self, x):
        return self.down(F.gelu(self.mid(self.norm(self.up(x)))))


def test_backend_registered_by_entry_point_without_import():
    code = textwrap.dedent("""
        import torch
        from torch._dynamo.backends.registry import lookup_backend
        assert "wtacrs" in torch._dynamo.list_backends()
        fn = lookup_backend("wtacrs")
        assert fn.__module__ == "wtacompile.backend", fn.__module__
        m = torch.nn.Linear(8, 8)
        y = torch.compile(m, backend="wtacrs", options={"inner": "aot_eager"})(torch.randn(40, 8))
        y.sum().backward()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_unknown_option_lists_valid_keys():
    with pytest.raises(ValueError, match="valid options are: keep_ratio"):
        WTAConfig.from_options({"keep_ration": 0.3})
    model = MLP()
    # Dynamo wraps what a backend raises; the user's error is the ValueError inside.
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="valid options are") as info:
        torch.compile(model, backend="wtacrs", options={"ratio": 0.2})(torch.randn(4, 16))
    assert isinstance(info.value.inner_exception, ValueError)


@pytest.mark.parametrize(
    "options,match",
    [({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 2}, "keep_ratio"),
     ({"method": "best"}, "choose one of"), ({"inner": "tvm"}, "inner compiler"),
     ({"min_rows": 0}, "min_rows"), ({"keep_ratios": {"a.weight": 1.5}}, "a.weight")],
)
def test_bad_option_values(options, match):
    with pytest.raises(ValueError, match=match):
        WTAConfig.from_options(options)


def test_config_is_frozen_and_fingerprinted():
    a = WTAConfig.from_options({"keep_ratio": 0.3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.keep_ratio = 0.1
    assert a.fingerprint() != WTAConfig.from_options({"keep_ratio": 0.1}).fingerprint()


def test_inference_graph_untouched():
    model = MLP()
    wtacompile.clear_reports()
    with torch.no_grad():
        torch.compile(model, backend="wtacrs", options=AOT)(torch.randn(64, 16))
    (report,) = wtacompile.compile_reports()
    assert not report.training and report.sites == ()


def test_decisions_and_report():
    model = MLP()
    wtacompile.clear_reports()
    x = torch.randn(4, 64, 16)
    torch.compile(model, backend="wtacrs", options=AOT)(x).sum().backward()
    report = wtacompile.last_compile_report()
    sites = {s.weight: s for s in report.sites}
    assert set(sites) == {"up.weight", "mid.weight", "down.weight"}
    # LayerNorm's backward needs its input (up's output), not its output: mid frees it; GELU's
    # backward needs its input (mid's output), not down's input. Nothing else keeps x either.
    assert {w: (s.verdict, s.sampled, s.keep_ratio) for w, s in sites.items()} == {
        "up.weight": ("frees", True, 0.3),
        "mid.weight": ("frees", True, 0.3),
        "down.weight": ("frees", True, 0.3),
    }
    assert sites["mid.weight"].input_bytes == 4 * 64 * 32 * 4
    for s in report.sites:
        assert s.reason == "input saved only for the weight gradients"
        kept = 77 * s.in_features * 4 + 77 * 8  # k = ceil(0.3 * 256) rows and their indices
        assert s.freed_bytes == s.input_bytes - kept
    assert "mid.weight" in str(report)


def test_a_graph_without_linears_points_to_every_report():
    """After a graph break the last graph may hold no linear (GPT-2's tail after its logger
    call): its report says so and where the others are, instead of an empty table."""
    from wtacompile.report import GraphReport

    text = str(GraphReport.build(7, "f", True))
    assert text.startswith("wtacrs graph 7: no linear layers in this graph") and "compile_reports()" in text


def test_include_exclude_and_per_weight_ratios():
    model = MLP()
    x = torch.randn(256, 16)
    wtacompile.clear_reports()
    opts = dict(AOT, exclude=["mid.*"], keep_ratios={"down.weight": 0.1})
    torch.compile(model, backend="wtacrs", options=opts)(x).sum().backward()
    sites = {s.weight: s for s in wtacompile.last_compile_report().sites}
    assert not sites["mid.weight"].sampled and sites["mid.weight"].reason == "excluded by include/exclude"
    assert (sites["down.weight"].sampled, sites["down.weight"].keep_ratio) == (True, 0.1)
    assert (sites["up.weight"].sampled, sites["up.weight"].keep_ratio) == (True, 0.3)


def test_shared_input_with_dense_sibling_is_not_sampled():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.q, self.k, self.v = nn.Linear(64, 8), nn.Linear(64, 8), nn.Linear(64, 8)

        def forward(self, x):
            h = self.norm(x)
            return self.q(h) * self.k(h) + self.v(h)

    model = QKV()
    x = torch.randn(128, 64)
    wtacompile.clear_reports()
    torch.compile(model, backend="wtacrs", options=dict(AOT, exclude=["v.*"]))(x).sum().backward()
    sites = {s.weight: s for s in wtacompile.last_compile_report().sites}
    # v keeps the shared input for its own dW: sampling q and k would only add memory.
    assert sites["q.weight"].verdict == "adds-memory" and not sites["q.weight"].sampled
    torch._dynamo.reset()
    wtacompile.clear_reports()
    torch.compile(model, backend="wtacrs", options=AOT)(x).sum().backward()
    sites = {s.weight: s for s in wtacompile.last_compile_report().sites}
    assert all(sites[n].sampled for n in ("q.weight", "k.weight", "v.weight"))
    assert "shared by 3" in sites["q.weight"].reason


def _saved_bytes(model, options, x, backend="wtacrs"):
    compiled = torch.compile(model, backend=backend, options=options)
    with SavedTensorMeter(model.parameters()) as meter:
        y = compiled(x)
    y.sum().backward()
    return meter.activation_bytes


def test_never_reuses_a_graph_compiled_for_another_ratio():
    model = MLP()
    x = torch.randn(512, 16)
    dense = _saved_bytes(model, dict(AOT, keep_ratio=1.0), x)
    at_03 = _saved_bytes(model, dict(AOT, keep_ratio=0.3), x)  # no dynamo reset in between
    at_01 = _saved_bytes(model, dict(AOT, keep_ratio=0.1), x)
    at_03_again = _saved_bytes(model, dict(AOT, keep_ratio=0.3), x)
    assert at_01 < at_03 < dense
    assert at_03_again == at_03


def test_varying_sequence_length_does_not_recompile_every_step():
    model = MLP()
    compiled = torch.compile(model, backend="wtacrs", options=AOT)
    wtacompile.clear_reports()
    for seq in (32, 40, 48, 56, 64):
        compiled(torch.randn(2, seq, 16)).sum().backward()
    assert len(wtacompile.compile_reports()) <= 2


def test_graph_break_keys_decisions_by_parameter_name():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = MLP()
            self.second = MLP()

        def forward(self, x):
            h = self.first(x)
            torch._dynamo.graph_break()
            return self.second(torch.cat([h, h], dim=-1))

    model = Broken()
    wtacompile.clear_reports()
    torch.compile(model, backend="wtacrs", options=AOT)(torch.randn(128, 16)).sum().backward()
    reports = [r for r in wtacompile.compile_reports() if r.training]
    assert len(reports) == 2
    names = [{s.weight for s in r.sites} for r in reports]
    assert names[0] == {"first.up.weight", "first.mid.weight", "first.down.weight"}
    assert names[1] == {"second.up.weight", "second.mid.weight", "second.down.weight"}


def test_random_choice_is_saved_not_redrawn_under_activation_memory_budget():
    """Under an activation budget the partitioner recomputes what it can; the sampling op is
    banned from that, so compiled grads equal the eager op's under the same seed."""
    torch.manual_seed(0)
    # Matmul outputs cannot be recomputed cheaply: the partitioner must save them densely.
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16))
    x = torch.randn(512, 16)
    wtacompile.clear_reports()
    with torch._functorch.config.patch(activation_memory_budget=0.7):
        compiled = torch.compile(model, backend="wtacrs", options=AOT)
        torch.manual_seed(123)
        compiled(x).sum().backward()
    sampled = [s.weight for s in wtacompile.last_compile_report().sampled_sites]
    assert sampled
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(123)
    with wtacompile.sample_linears(model=model, include=sampled):
        model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-5, atol=1e-6)


def test_input_saved_anyway_is_sampled_for_speed_with_rows_gathered_in_backward():
    """tanh's backward keeps its output, which the next linear reads: a compact copy would add
    to it, so forward keeps only the draw (indices and scales) and backward gathers the rows from
    the saved output. Same rows as the eager op under the same seed, and nothing saved but the draw."""
    from wtacompile.estimator import num_kept_rows

    class TanhThenLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.proj = nn.Linear(32, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.proj(torch.tanh(self.up(x)))

    torch.manual_seed(0)
    model, x = TanhThenLinear(), torch.randn(256, 32)
    saved, grads = {}, {}
    for name, backend, options in (("dense", "aot_eager", None),
                                   ("wtacrs", "wtacrs", dict(AOT, exclude=["up.*"]))):
        torch._dynamo.reset()
        wtacompile.clear_reports()
        trained = copy.deepcopy(model)
        torch.manual_seed(123)
        saved[name] = _saved_bytes(trained, options, x, backend)
        grads[name] = {n: p.grad for n, p in trained.named_parameters()}
    proj = next(s for s in wtacompile.last_compile_report().sites if s.weight == "proj.weight")
    assert proj.sampled and proj.verdict == "adds-memory" and "gathered in backward" in proj.reason
    k = num_kept_rows(256, 0.3, WTAConfig().min_rows)
    assert saved["wtacrs"] == saved["dense"] + k * (8 + 4)  # int64 indices and float32 scales
    eager = copy.deepcopy(model)
    torch.manual_seed(123)
    with wtacompile.sample_linears(model=eager, include=["proj.weight"]):
        eager(x).sum().backward()
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads["wtacrs"][name], p.grad, rtol=1e-5, atol=1e-6)
    assert not torch.equal(grads["wtacrs"]["proj.weight"], grads["dense"]["proj.weight"])
    # Without a partitioner (inner="eager") nothing gathers in backward: the copy would add.
    torch._dynamo.reset()
    wtacompile.clear_reports()
    torch.compile(copy.deepcopy(model), backend="wtacrs", options=dict(inner="eager", exclude=["up.*"]))(x)
    proj = next(s for s in wtacompile.last_compile_report().sites if s.weight == "proj.weight")
    assert proj.verdict == "adds-memory" and not proj.sampled


def test_sampling_never_saves_more_than_the_activation_budget_alone(caplog):
    """At a budget so tight the dense partition keeps only the graph's input, every compact copy
    would be memory on top: the linears stay exact, and the user is told."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16))
    x = torch.randn(512, 16)
    saved = {}
    for name, options in (("dense", None), ("wtacrs", AOT)):
        torch._dynamo.reset()
        backend = "aot_eager" if options is None else "wtacrs"
        with torch._functorch.config.patch(activation_memory_budget=0.05), caplog.at_level("WARNING", "wtacompile"):
            saved[name] = _saved_bytes(copy.deepcopy(model), options, x, backend)
    assert not wtacompile.last_compile_report().sampled_sites
    assert "the sampled partition of this graph saves" in caplog.text
    assert saved["wtacrs"] == saved["dense"] == x.numel() * x.element_size()


def test_compiled_weight_grad_is_unbiased():
    torch.manual_seed(0)
    model = MLP(d=8, h=16, out=6)
    x = torch.exp(torch.randn(96, 1)) * torch.randn(96, 8)
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.3))
    compiled(x).sum().backward()
    sampled = {s.weight for s in wtacompile.last_compile_report().sampled_sites}
    assert "mid.weight" in sampled
    model.zero_grad()
    exact = torch.autograd.grad(model(x).sum(), model.mid.weight)[0]
    draws = 1500
    samples = []
    for _ in range(draws):
        (g,) = torch.autograd.grad(compiled(x).sum(), model.mid.weight)
        samples.append(g)
    samples = torch.stack(samples)
    z = (samples.mean(0) - exact) / (samples.std(0) / draws**0.5)
    z2 = (z**2).mean().item()
    assert 0.6 < z2 < 1.6, z2


def test_autocast_entered_inside_the_compiled_function():
    """accelerate's mixed precision (Trainer ``bf16=True``) enters autocast inside the compiled
    forward, so backward runs outside it. Forward, dX and db equal dense training's bit for bit,
    every gradient comes back in its parameter's dtype, and dW stays unbiased."""
    torch.manual_seed(0)
    first, second = nn.Linear(16, 32), nn.Linear(32, 8)
    x = torch.randn(4, 24, 16)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = second(F.gelu(first(x)))
        return h.float().pow(2).mean()

    def grads(fn):
        x_in = x.clone().requires_grad_()
        loss = fn(x_in)
        return (loss, *torch.autograd.grad(loss, [x_in, first.bias, second.bias, first.weight, second.weight]))

    dense = grads(torch.compile(step, backend="aot_eager"))
    sampled_step = torch.compile(step, backend="wtacrs", options=dict(AOT, keep_ratio=0.5))
    sampled = grads(sampled_step)
    # A function's weights are named by what they are to it: both "weight"; the second, #1.
    assert "weight#1" in {s.weight for s in wtacompile.last_compile_report().sampled_sites}
    for exact, got in zip(dense[:4], sampled[:4]):  # loss, dX, both db
        assert got.dtype == exact.dtype and torch.equal(got, exact)
    assert sampled[4].dtype == sampled[5].dtype == torch.float32
    draws = torch.stack([grads(sampled_step)[5] for _ in range(400)])
    z = (draws.mean(0) - dense[5]) / (draws.std(0) / 400**0.5 + 1e-12)
    assert 0.5 < (z**2).mean().item() < 2.0  # unbiased up to bf16 rounding of the scaled rows
