"""The row sampler alone: k, edge cases, determinism, unbiasedness of both implementations (the
host one CPUs run and the device one GPUs run). Gradient statistics are in test_sampled_linear.py."""

import pytest
import torch

from wtacompile.estimator import (METHODS, UNBIASED_METHODS, num_kept_rows, select_rows, select_rows_on_device,
                                  select_rows_on_host)


@pytest.fixture(params=[select_rows_on_host, select_rows_on_device], ids=["host", "device"])
def select(request):
    return request.param


@pytest.mark.parametrize(
    "n,ratio,min_rows,expected",
    [(10, 0.3, 1, 3), (100, 0.3, 10, 30), (7, 0.3, 10, 7), (1000, 0.1, 10, 100), (11, 0.5, 1, 6),
     (3, 1.0, 10, 3), (20, 0.05, 10, 10)],
)
def test_num_kept_rows_is_exact_ceiling(n, ratio, min_rows, expected):
    assert num_kept_rows(n, ratio, min_rows) == expected


@pytest.mark.parametrize("method", METHODS)
def test_shapes_and_valid_indices(select, method):
    scores = torch.rand(101) + 0.1
    sel = select(scores, 37, method)
    assert sel.index.shape == (37,) and sel.index.dtype == torch.int64
    assert sel.scale.shape == (37,) and sel.scale.dtype == torch.float32
    assert int(sel.index.min()) >= 0 and int(sel.index.max()) < 101
    assert torch.all(sel.scale > 0)


def test_k_at_least_n_keeps_everything_exactly(select):
    sel = select(torch.rand(5), 9, "wtacrs")
    assert torch.equal(sel.index, torch.arange(5))
    assert torch.equal(sel.scale, torch.ones(5))


def test_wtacrs_keeps_dominant_rows_as_winners(select):
    scores = torch.ones(100)
    scores[[3, 50, 77]] = 1000.0
    sel = select(scores, 10, "wtacrs")
    winners = sel.index[sel.scale == 1.0]
    assert {3, 50, 77} <= set(winners.tolist())


def test_topk_is_deterministic_top_rows(select):
    scores = torch.arange(20, dtype=torch.float32)
    sel = select(scores, 4, "topk")
    assert sorted(sel.index.tolist()) == [16, 17, 18, 19]
    assert torch.equal(sel.scale, torch.ones(4))


def test_all_zero_scores_fall_back_to_uniform(select):
    sel = select(torch.zeros(50), 10, "wtacrs")
    assert torch.allclose(sel.scale, torch.full((10,), 50 / 10))


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_rows_are_always_kept(select, method):
    scores = torch.rand(64) + 0.5
    scores[[5, 40]] = float("nan")
    scores[12] = float("inf")
    for seed in range(20):
        torch.manual_seed(seed)
        sel = select(scores, 8, method)
        assert {5, 12, 40} <= set(sel.index.tolist())
        assert torch.isfinite(sel.scale).all()


@pytest.mark.parametrize("method", METHODS)
def test_more_non_finite_rows_than_slots_fill_every_slot_with_them(select, method):
    scores = torch.rand(29) + 0.5
    scores[[4, 9, 20]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for k in (1, 2, 3):
        sel = select(scores, k, method)
        assert set(sel.index.tolist()) <= {4, 9, 20} and len(set(sel.index.tolist())) == k
        assert torch.equal(sel.scale, torch.ones(k))
    sel = select(torch.full((12,), float("nan")), 5, method)
    assert len(set(sel.index.tolist())) == 5 and torch.equal(sel.scale, torch.ones(5))


def test_residual_mass_zero_gives_exact_winners(select):
    scores = torch.zeros(40)
    scores[:3] = torch.tensor([5.0, 4.0, 3.0])
    sel = select(scores, 6, "wtacrs")
    kept = sel.scale > 0
    assert set(sel.index[kept].tolist()) == {0, 1, 2}
    assert torch.equal(sel.scale[kept], torch.ones(3))


def test_same_seed_same_selection(select):
    scores = torch.rand(300)
    torch.manual_seed(7)
    a = select(scores, 40, "wtacrs")
    torch.manual_seed(7)
    b = select(scores, 40, "wtacrs")
    torch.manual_seed(8)
    c = select(scores, 40, "wtacrs")
    assert torch.equal(a.index, b.index) and torch.equal(a.scale, b.scale)
    assert not torch.equal(a.index, c.index)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown sampling method"):
        select_rows(torch.rand(10), 3, "random")
    for other in (select_rows_on_host, select_rows_on_device):
        with pytest.raises(ValueError, match="unknown sampling method"):
            other(torch.rand(10), 3, "random")
    with pytest.raises(ValueError, match="needs CPU scores"):
        select_rows_on_host(torch.rand(10, device="meta"), 3)


@pytest.mark.parametrize("method", UNBIASED_METHODS)
@pytest.mark.parametrize("case", ["spread", "dominant", "zeros"])
def test_weighted_sum_of_the_kept_rows_is_unbiased(select, method, case):
    """``Σ_t s_t f(i_t)`` has mean ``Σ_i f(i)`` for any ``f`` (here: f = a row's value), which is
    what makes ``Σ_t s_t dY_{i_t}ᵀ X_{i_t}`` unbiased; checked over many draws to 5 standard errors."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(150, generator=gen) + 0.5
    if case == "dominant":
        scores[[7, 70, 140]] = 40.0  # wtacrs keeps these as winners
    if case == "zeros":
        scores[::3] = 0.0  # zero-score rows must not be drawn: f is 0 there, as X_i is
    values = torch.randn(150, generator=gen, dtype=torch.float64) * (scores > 0)
    torch.manual_seed(1)
    estimates = torch.empty(4000, dtype=torch.float64)
    for t in range(estimates.numel()):
        sel = select(scores, 20, method)
        estimates[t] = (sel.scale.double() * values[sel.index]).sum()
    error = estimates.std() / estimates.numel() ** 0.5
    assert abs(estimates.mean() - values.sum()) < 5 * error + 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_host_and_device_agree_on_the_winners(method):
    """The deterministic part of a draw, the winners (the leading slots, scale 1, in the order
    non-finite rows first, then by score), is the same choice in both implementations."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        scores = torch.rand(97, generator=gen) ** 6
        scores[torch.randint(0, 97, (trial % 4,), generator=gen)] = float("nan")
        scores[: trial % 5] = 0.0
        host = select_rows_on_host(scores, 31, method)
        device = select_rows_on_device(scores, 31, method)
        num_winners = int((host.scale == 1).cumprod(0).sum())
        assert num_winners == int((device.scale == 1).cumprod(0).sum())
        assert num_winners >= int(scores.isnan().sum()) and (method != "topk" or num_winners == 31)
        assert torch.equal(host.index[:num_winners], device.index[:num_winners])
