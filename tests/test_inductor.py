"""The default inner compiler, Inductor (C++ codegen on CPU: slow to compile, so one model)."""

import copy

import torch

import wtacompile
from hf_models import build
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
