"""The default inner compiler, Inductor (C++ codegen on CPU: slow to compile, so one model)."""

import copy

import torch

import wtacompile
from hf_models import PreNormMLP, build, saved_activation_bytes
from wtacompile import SavedTensorMeter


def _step(model, batch, options):
    compiled = torch.compile(model, backend="wtacrs", options=options)
    with SavedTensorMeter(model.parameters()) as meter:
        out = compiled(**batch)
    out.loss.backward()
    return out, meter.activation_bytes


def test_inductor_inner_compiler_samples_and_saves_less():
    model, batch = build("llama")
    reference = copy.deepcopy(model)
    ref_out, ref_saved = _step(reference, batch, {"keep_ratio": 1.0})  # Inductor alone
    wtacompile.clear_reports()
    out, saved = _step(model, batch, {"keep_ratio": 0.3})
    assert any(r.sampled_sites for r in wtacompile.compile_reports())
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-4, atol=1e-4)
    assert saved < ref_saved
    grads = dict(model.named_parameters())
    sampled = {s.weight for r in wtacompile.compile_reports() for s in r.sampled_sites}
    for name, p in reference.named_parameters():
        assert torch.isfinite(grads[name].grad).all()
    exact = [(name, p) for name, p in reference.named_parameters() if name not in sampled]
    assert exact and all(p.grad is not None for _, p in exact)
    for name, p in exact:
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-4)
    # The gradient-aware scores' states: Inductor's backward wrote each sampled weight's state
    # in place (a graph input mutated in backward), once for the one backward.
    states = wtacompile.sampler_state_dict(model)
    assert set(states) == sampled and all(s[-1].item() == 1 for s in states.values())


class _ReluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wi = torch.nn.Linear(64, 256, bias=False)
        self.wo = torch.nn.Linear(256, 64, bias=False)

    def forward(self, x):
        return self.wo(torch.relu(self.wi(x))).square().mean()


def test_relu_mask_saved_as_bf16_on_cpu_same_gradients_predicted_bytes(monkeypatch):
    """Sampling ``wo`` frees the ReLU's output, so the partitioner saves the ReLU's boolean
    mask instead; on CPU it is saved as bf16 (Inductor writes bool buffers slowly). Gradients
    are bit-identical to the boolean mask's, and the planner predicts the bytes measured."""
    import wtacompile.lower as lower

    torch.manual_seed(0)
    model = _ReluMLP()
    x = torch.randn(512, 64).abs().requires_grad_()  # rows of very different norms: a real draw
    options = {"keep_ratio": 0.3, "include": ["wo.*"], "row_scores": "norm"}
    runs = {}
    for widen in (True, False):
        if not widen:
            monkeypatch.setattr(lower, "_MIN_MASK_NUMEL", 1 << 40)
        torch._dynamo.reset()
        copy_ = copy.deepcopy(model)
        compiled = torch.compile(copy_, backend="wtacrs", options=options)
        dtypes = []

        def pack(t):
            dtypes.append((tuple(t.shape), t.dtype))
            return t

        torch.manual_seed(1)
        xi = x.detach().clone().requires_grad_()
        with SavedTensorMeter(copy_.parameters()) as meter:
            loss = compiled(xi)
        loss.backward()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            compiled(xi.detach().requires_grad_())
        runs[widen] = meter.activation_bytes, dtypes, [p.grad for p in copy_.parameters()] + [xi.grad]
    (wide_bytes, wide_dtypes, wide_grads), (bool_bytes, bool_dtypes, bool_grads) = runs[True], runs[False]
    assert ((512, 256), torch.bfloat16) in wide_dtypes and ((512, 256), torch.bool) in bool_dtypes
    assert wide_bytes == bool_bytes + 512 * 256  # one more byte per mask element
    for a, b in zip(wide_grads, bool_grads):
        assert torch.equal(a, b)
    monkeypatch.undo()
    # What the analysis predicts for the same compile: the mask sized as saved, two bytes.
    from wtacompile.config import WTAConfig
    from wtacompile.memory_model import MemoryModel, parameter_bytes
    from wtacompile.passes import choose_ratios
    from wtacompile.planning.capture import capture_analyses

    (state,) = [choose_ratios(None, s) for s in capture_analyses(model, (x,), WTAConfig(**options), None)]
    (group,) = [g for g in state.analysis.groups if g.weights == ("wo.weight",)]
    assert state.decisions["wo.weight"].sampled and group.verdict == "frees"
    predicted = MemoryModel(*parameter_bytes(model.parameters(), "adamw"), graphs=(state.analysis.memory,),
                            inputs=state.analysis.sampleable_inputs(state.sites, prefix="0:"),
                            trace_batch=1, min_rows=WTAConfig().min_rows)
    assert predicted.planned_activations(None, {f"0:{group.root}": 0.3}) == wide_bytes


def test_a_raised_budget_under_inductor_saves_no_more_than_the_budget_alone():
    """The analysis partitions copies of the joint graph after Inductor's joint passes, as
    Inductor does; the budget it raises the sampled graph to is what Inductor compiles (the same
    bytes as asking for that budget outright), within the dense partition's bytes at the
    user's budget and above what the sampled graph saves at the user's budget itself."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[PreNormMLP() for _ in range(3)])
    x = torch.randn(512, 64, requires_grad=True)

    def saved_by(options):
        return saved_activation_bytes(model, x, options)

    with torch._functorch.config.patch(activation_memory_budget=0.5):
        dense = saved_by({"keep_ratio": 1.0})
        at_budget = saved_by({"match_budget_bytes": False, "row_scores": "norm"})
        wtacompile.clear_reports()
        matched = saved_by({"row_scores": "norm"})
    (report,) = [r for r in wtacompile.compile_reports() if r.training]
    assert report.raised_from == 0.5 and report.activation_memory_budget > 0.5 and report.sampled_sites
    # A LayerNorm output the backward recomputes only for its kept rows is reported as such.
    assert any("only to gather the kept rows" in s.reason for s in report.sampled_sites), report.table()
    assert at_budget < matched <= dense
    assert saved_by({"activation_memory_budget": report.activation_memory_budget, "match_budget_bytes": False,
                     "row_scores": "norm"}) == matched


def test_a_gelu_feeding_a_sampled_linear_is_evaluated_once_per_element_in_forward(monkeypatch):
    """Inductor inlines an unrealised pointwise result into each reader that does not need a
    buffer: with the draw's row norms traced before the down-projection's GEMM, the forward
    evaluated ``gelu(h)`` three times (norms, the GEMM's input, the gather). Ordered after the
    GEMM (wtacompile.scheduling), the forward's generated code has as many ``erf`` as Inductor
    alone's, and more without the reordering."""
    from torch._inductor.utils import run_and_get_code

    import wtacompile.scheduling as scheduling

    torch.manual_seed(0)
    model, x = PreNormMLP(), torch.randn(512, 64)

    def erf_calls(options):
        torch._dynamo.reset()
        _, codes = run_and_get_code(torch.compile(copy.deepcopy(model), backend="wtacrs", options=options), x)
        (forward,) = codes  # backward compiles at the first backward, which never comes here
        return forward.count(".erf()") + forward.count("std::erf(")

    alone = erf_calls({"keep_ratio": 1.0})
    assert alone >= 1
    assert erf_calls({"keep_ratio": 0.3}) == alone
    monkeypatch.setattr(scheduling, "draw_after_first_matmul", lambda graph: 0)
    assert erf_calls({"keep_ratio": 0.3}) > alone
