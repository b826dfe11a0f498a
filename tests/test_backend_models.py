"""torch.compile(backend="wtacrs") on unmodified Hugging Face models (aot_eager inner compiler)."""

import copy

import pytest
import torch

import wtacompile
from hf_models import FAMILIES, build
from wtacompile import SavedTensorMeter

OPTIONS = {"inner": "aot_eager", "keep_ratio": 0.3}
# keep_ratio 1.0 leaves every linear exact: the inner compiler alone, with the same partitioner.
INNER_ALONE = {"inner": "aot_eager", "keep_ratio": 1.0}


def _train(model, batch, backend, options, steps):
    compiled = torch.compile(model, backend=backend, options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    params = list(model.parameters())
    losses, saved, first = [], [], None
    for _ in range(steps):
        with SavedTensorMeter(params) as meter:
            out = compiled(**batch)
        saved.append(meter.activation_bytes)
        out.loss.backward()
        if first is None:
            first = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses, saved, first


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_saves_less(family):
    model, batch = build(family)
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    ref_losses, ref_saved, (ref_out, ref_grads) = _train(reference, batch, "wtacrs", INNER_ALONE, 3)
    wtacompile.clear_reports()
    torch.manual_seed(0)
    losses, saved, (out, grads) = _train(model, batch, "wtacrs", OPTIONS, 3)

    reports = [r for r in wtacompile.compile_reports() if r.training]
    # Tied weights (T5's lm_head is shared.weight) show up under the name the graph used.
    canonical = {id(p): n for n, p in model.named_parameters()}
    by_any_name = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    sampled = {by_any_name[s.weight.split("#")[0]] for r in reports for s in r.sampled_sites}
    assert sampled, f"{family}: nothing sampled"
    # Forward is exact.
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-5)
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-5)
    # Every gradient but the sampled weights' is the exact one.
    for name, grad in ref_grads.items():
        if name in sampled:
            continue
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{family} {name}: {m}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert saved[0] < ref_saved[0], (saved, ref_saved)
