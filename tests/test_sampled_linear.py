"""The sampled-save linear op: exactness, unbiasedness, variance ordering, memory, edge cases."""

import pytest
import torch
import torch.nn.functional as F

from conftest import heavy_tailed_rows
from wtacompile import SavedTensorMeter, num_kept_rows, sampled_linear
from wtacompile.estimator import UNBIASED_METHODS


def _weight_grads(x, grad_out, weight, *, method, keep_ratio, draws, seed=0):
    """``draws`` sampled weight gradients of one fixed (x, dY), stacked."""
    torch.manual_seed(seed)
    out = []
    for _ in range(draws):
        w = weight.detach().requires_grad_()
        y = sampled_linear(x, w, keep_ratio=keep_ratio, method=method, min_rows=1)
        (gw,) = torch.autograd.grad(y, w, grad_out)
        out.append(gw)
    return torch.stack(out)


ROWS = {"heavy": lambda: heavy_tailed_rows(96, 12, seed=1), "flat": lambda: torch.randn(96, 12)}


@pytest.mark.parametrize("rows", ["heavy", "flat"])
@pytest.mark.parametrize("method", UNBIASED_METHODS)
def test_weight_grad_is_unbiased(method, rows):
    torch.manual_seed(3)
    x = ROWS[rows]()
    grad_out = torch.randn(96, 10)
    weight = torch.randn(10, 12)
    exact = grad_out.t() @ x
    draws = 1500
    samples = _weight_grads(x, grad_out, weight, method=method, keep_ratio=0.3, draws=draws)
    mean = samples.mean(0)
    stderr = samples.std(0) / draws**0.5
    z2 = (((mean - exact) / stderr) ** 2).mean().item()
    # 120 roughly independent chi²(1) terms: mean 1, sd ≈ 0.13. A bias of even 1/4 of the noise
    # of one draw would push it far above 2.
    assert 0.6 < z2 < 1.6, f"mean z² = {z2:.3f}"


def test_topk_is_biased():
    torch.manual_seed(3)
    x = torch.randn(96, 12)
    grad_out, weight = torch.randn(96, 10), torch.randn(10, 12)
    samples = _weight_grads(x, grad_out, weight, method="topk", keep_ratio=0.3, draws=2)
    assert torch.equal(samples[0], samples[1])  # deterministic
    assert not torch.allclose(samples[0], grad_out.t() @ x, rtol=0.05)


def test_variance_ordering_on_heavy_tailed_rows():
    torch.manual_seed(5)
    x = heavy_tailed_rows(200, 16, sigma=1.5, seed=2)
    grad_out, weight = torch.randn(200, 8), torch.randn(8, 16)
    total_var = {}
    for method in UNBIASED_METHODS:
        samples = _weight_grads(x, grad_out, weight, method=method, keep_ratio=0.3, draws=600)
        total_var[method] = samples.var(0).sum().item()
    assert total_var["wtacrs"] < total_var["crs"] < total_var["uniform"], total_var


@pytest.mark.parametrize("shape", [(37, 24), (3, 13, 24), (2, 3, 5, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_output_grad_input_grad_bias_exact(shape, with_bias):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(16, 24, requires_grad=True)
    b = torch.randn(16, requires_grad=True) if with_bias else None
    y = sampled_linear(x, w, b, keep_ratio=0.3)
    y_ref = F.linear(x, w, b)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    inputs = (x, w, b) if with_bias else (x, w)
    grads = torch.autograd.grad(y, inputs, g)
    grads_ref = torch.autograd.grad(y_ref, inputs, g)
    assert torch.equal(grads[0], grads_ref[0])
    # Every gradient but the weight's (index 1) is exact: dX above, db here when there is a bias.
    for got, want in zip(grads[2:], grads_ref[2:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert grads[1].shape == w.shape


def test_non_contiguous_input():
    torch.manual_seed(0)
    base = torch.randn(24, 40, requires_grad=True)
    x = base.t()  # (40, 24), non-contiguous
    w = torch.randn(8, 24, requires_grad=True)
    y = sampled_linear(x, w, keep_ratio=0.5)
    assert torch.equal(y, F.linear(x, w))
    y.sum().backward()
    assert torch.allclose(base.grad, torch.ones(40, 8).mm(w).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 30, 32, dtype=dtype, requires_grad=True)
    w = torch.randn(16, 32, dtype=dtype, requires_grad=True)
    b = torch.randn(16, dtype=dtype, requires_grad=True)
    y = sampled_linear(x, w, b, keep_ratio=0.3)
    assert y.dtype == dtype and torch.equal(y, F.linear(x, w, b))
    y.float().sum().backward()
    assert w.grad.dtype == dtype and torch.isfinite(w.grad.float()).all()


def test_autocast_matches_dense_linear():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sampled_linear(x, w, keep_ratio=0.3)
        y_ref = F.linear(x, w)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_fewer_rows_than_min_rows_is_exact():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    w = torch.randn(4, 8, requires_grad=True)
    y = sampled_linear(x, w, keep_ratio=0.3, min_rows=10)
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, w, g)
    torch.testing.assert_close(gw, g.t() @ x)


def test_all_zero_rows():
    x = torch.zeros(50, 8)
    w = torch.randn(4, 8, requires_grad=True)
    y = sampled_linear(x, w, keep_ratio=0.2)
    (gw,) = torch.autograd.grad(y, w, torch.randn_like(y))
    assert torch.equal(gw, torch.zeros_like(gw))


def test_non_finite_inputs_propagate_like_dense():
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    x[17, 3] = float("nan")
    w = torch.randn(4, 8, requires_grad=True)
    for seed in range(5):
        torch.manual_seed(seed)
        y = sampled_linear(x, w, keep_ratio=0.1)
        (gw,) = torch.autograd.grad(y, w, torch.ones_like(y))
        (gw_dense,) = torch.autograd.grad(F.linear(x, w), w, torch.ones_like(y))
        # Column 3 is NaN in the dense grad; every other entry stays finite, as in dense.
        assert torch.equal(torch.isnan(gw), torch.isnan(gw_dense))
    x_clean = torch.randn(200, 8)
    x_clean[5] = float("inf")
    y = sampled_linear(x_clean, w, keep_ratio=0.1)
    (gw,) = torch.autograd.grad(y, w, torch.ones_like(y))
    assert not torch.isfinite(gw).all()  # the overflow reaches the grad, so GradScaler sees it


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "0.3"])
def test_bad_keep_ratio_raises(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        sampled_linear(torch.randn(4, 4), torch.randn(2, 4, requires_grad=True), keep_ratio=bad)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="choose one of"):
        sampled_linear(torch.randn(4, 4), torch.randn(2, 4, requires_grad=True), method="foo")


def test_same_seed_same_gradients():
    x = torch.randn(300, 16)
    w0 = torch.randn(8, 16)
    grads = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        w = w0.clone().requires_grad_()
        sampled_linear(x, w, keep_ratio=0.2).sum().backward()
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])


def test_saves_only_compact_rows_and_indices():
    torch.manual_seed(0)
    n, d, ratio = 1000, 64, 0.3
    x = torch.randn(n, d, requires_grad=True)
    w = torch.randn(32, d, requires_grad=True)
    with SavedTensorMeter(exclude=[w]) as meter:
        y = sampled_linear(x, w, keep_ratio=ratio)
    k = num_kept_rows(n, ratio, 10)
    expected = k * d * 4 + k * 8
    assert meter.activation_bytes == expected
    assert meter.activation_bytes <= ratio * n * d * 4 + k * 8
    with SavedTensorMeter(exclude=[w]) as dense:
        F.linear(x, w)
    assert dense.activation_bytes == n * d * 4
    y.sum().backward()


def test_frozen_weight_saves_no_activation():
    x = torch.randn(100, 16, requires_grad=True)
    w = torch.randn(8, 16)  # frozen
    with SavedTensorMeter(exclude=[w]) as meter:
        y = sampled_linear(x, w)
    assert meter.activation_bytes == 0
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(100, 8) @ w)


def test_input_without_grad_and_keep_ratio_one():
    x = torch.randn(100, 16)
    w = torch.randn(8, 16, requires_grad=True)
    y = sampled_linear(x, w, keep_ratio=1.0)
    (gw,) = torch.autograd.grad(y, w, torch.ones_like(y))
    assert torch.equal(gw, torch.autograd.grad(F.linear(x, w), w, torch.ones_like(y))[0])
    y = sampled_linear(x, w, keep_ratio=0.5)
    (gw,) = torch.autograd.grad(y, w, torch.ones_like(y))
    assert gw.shape == w.shape


def test_opcheck():
    scores = torch.randn(60, 16).norm(dim=1)
    op = torch.ops.wtacompile.sample_rows.default
    torch.library.opcheck(op, (scores, 18, "wtacrs"))
    torch.library.opcheck(op, (scores, 5, "crs"))


def test_linears_sharing_a_sample_are_each_unbiased():
    """q/k/v-style: one draw, one compact copy, three weight gradients, each unbiased."""
    from wtacompile.ops import linear_with_sampled_grad, sample_input

    torch.manual_seed(5)
    x = heavy_tailed_rows(80, 12, seed=2)
    weights = [torch.randn(6, 12, requires_grad=True) for _ in range(3)]
    grads_out = [torch.randn(80, 6) for _ in range(3)]
    exact = [g.t() @ x for g in grads_out]
    # The three estimates share every draw, so all their entries are correlated and their mean z²
    # moves together and widely: 0.54–2.4 over seeds 5–8 with either implementation of the draw
    # (host and device), 0.59–0.78 with 24000 draws where 6000 read 1.6–2.4. A wiring error (a
    # linear reading another's rows or dY) puts it in the hundreds; the bounds allow the spread.
    draws = 6000
    samples = [[] for _ in weights]
    for _ in range(draws):
        sample = sample_input(x, 0.3)
        outs = [linear_with_sampled_grad(x, w, None, *sample) for w in weights]
        grads = torch.autograd.grad(outs, weights, grads_out)
        for store, g in zip(samples, grads):
            store.append(g)
    for store, want in zip(samples, exact):
        stacked = torch.stack(store)
        z = (stacked.mean(0) - want) / (stacked.std(0) / draws**0.5)
        assert 0.3 < (z**2).mean().item() < 3.0


def test_sharing_a_sample_saves_one_copy():
    from wtacompile.ops import linear_with_sampled_grad, sample_input

    x = torch.randn(500, 32, requires_grad=True)
    weights = [torch.randn(8, 32, requires_grad=True) for _ in range(3)]
    with SavedTensorMeter(exclude=weights) as meter:
        sample = sample_input(x, 0.3)
        outs = [linear_with_sampled_grad(x, w, None, *sample) for w in weights]
    k = num_kept_rows(500, 0.3, 10)
    assert meter.activation_bytes == k * 32 * 4 + k * 8  # not three copies, and not x
    sum(o.sum() for o in outs).backward()


def test_compiles_in_one_graph_with_autocast_inside():
    """sampled_linear in user code compiled with fullgraph=True (nothing in it breaks the graph),
    autocast entered inside the compiled function: exact forward, fp32 gradients."""
    torch.manual_seed(0)
    w = torch.randn(16, 32, requires_grad=True)
    x = torch.randn(64, 32)

    def loss(x, sampled=True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = sampled_linear(x, w, keep_ratio=0.3) if sampled else F.linear(x, w)
        return y.float().square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(x)
    assert torch.equal(value, loss(x, sampled=False))
    value.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_both_steps_cast_as_f_linear_under_autocast():
    """sample_input and linear_with_sampled_grad called directly (as a rewritten graph calls
    them) inside autocast: rows drawn and saved in its dtype, output as F.linear's, and each
    gradient in its operand's dtype, with backward run outside the autocast region."""
    from wtacompile.ops import linear_with_sampled_grad, sample_input

    torch.manual_seed(0)
    x = torch.randn(4, 30, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample = sample_input(x, 0.3)
        y = linear_with_sampled_grad(x, w, b, sample.index, sample.x_saved)
        y_ref = F.linear(x, w, b)
    assert sample.x_saved.dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    dx, db = torch.autograd.grad(y_ref, (x, b), g)
    got_dx, got_dw, got_db = torch.autograd.grad(y, (x, w, b), g)  # outside autocast
    assert (got_dx.dtype, got_dw.dtype, got_db.dtype) == (torch.float32,) * 3
    assert torch.equal(got_dx, dx) and torch.equal(got_db, db)
