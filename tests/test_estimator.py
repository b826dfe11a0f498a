"""The row sampler alone: k, edge cases, determinism. Statistics are in test_sampled_linear.py."""

import pytest
import torch

from wtacompile.estimator import METHODS, num_kept_rows, select_rows


@pytest.mark.parametrize(
    "n,ratio,min_rows,expected",
    [(10, 0.3, 1, 3), (100, 0.3, 10, 30), (7, 0.3, 10, 7), (1000, 0.1, 10, 100), (11, 0.5, 1, 6),
     (3, 1.0, 10, 3), (20, 0.05, 10, 10)],
)
def test_num_kept_rows_is_exact_ceiling(n, ratio, min_rows, expected):
    assert num_kept_rows(n, ratio, min_rows) == expected


@pytest.mark.parametrize("method", METHODS)
def test_shapes_and_valid_indices(method):
    scores = torch.rand(101) + 0.1
    sel = select_rows(scores, 37, method)
    assert sel.index.shape == (37,) and sel.index.dtype == torch.int64
    assert sel.scale.shape == (37,) and sel.scale.dtype == torch.float32
    assert int(sel.index.min()) >= 0 and int(sel.index.max()) < 101
    assert torch.all(sel.scale > 0)


def test_k_at_least_n_keeps_everything_exactly():
    sel = select_rows(torch.rand(5), 9, "wtacrs")
    assert torch.equal(sel.index, torch.arange(5))
    assert torch.equal(sel.scale, torch.ones(5))


def test_wtacrs_keeps_dominant_rows_as_winners():
    scores = torch.ones(100)
    scores[[3, 50, 77]] = 1000.0
    sel = select_rows(scores, 10, "wtacrs")
    winners = sel.index[sel.scale == 1.0]
    assert {3, 50, 77} <= set(winners.tolist())


def test_topk_is_deterministic_top_rows():
    scores = torch.arange(20, dtype=torch.float32)
    sel = select_rows(scores, 4, "topk")
    assert sorted(sel.index.tolist()) == [16, 17, 18, 19]
    assert torch.equal(sel.scale, torch.ones(4))


def test_all_zero_scores_fall_back_to_uniform():
    sel = select_rows(torch.zeros(50), 10, "wtacrs")
    assert torch.allclose(sel.scale, torch.full((10,), 50 / 10))


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_rows_are_always_kept(method):
    scores = torch.rand(64) + 0.5
    scores[[5, 40]] = float("nan")
    scores[12] = float("inf")
    for seed in range(20):
        torch.manual_seed(seed)
        sel = select_rows(scores, 8, method)
        assert {5, 12, 40} <= set(sel.index.tolist())
        assert torch.isfinite(sel.scale).all()


@pytest.mark.parametrize("method", METHODS)
def test_more_non_finite_rows_than_slots_fill_every_slot_with_them(method):
    scores = torch.rand(29) + 0.5
    scores[[4, 9, 20]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for k in (1, 2, 3):
        sel = select_rows(scores, k, method)
        assert set(sel.index.tolist()) <= {4, 9, 20} and len(set(sel.index.tolist())) == k
        assert torch.equal(sel.scale, torch.ones(k))
    sel = select_rows(torch.full((12,), float("nan")), 5, method)
    assert len(set(sel.index.tolist())) == 5 and torch.equal(sel.scale, torch.ones(5))


def test_residual_mass_zero_gives_exact_winners():
    scores = torch.zeros(40)
    scores[:3] = torch.tensor([5.0, 4.0, 3.0])
    sel = select_rows(scores, 6, "wtacrs")
    kept = sel.scale > 0
    assert set(sel.index[kept].tolist()) == {0, 1, 2}
    assert torch.equal(sel.scale[kept], torch.ones(3))


def test_same_seed_same_selection():
    scores = torch.rand(300)
    torch.manual_seed(7)
    a = select_rows(scores, 40, "wtacrs")
    torch.manual_seed(7)
    b = select_rows(scores, 40, "wtacrs")
    torch.manual_seed(8)
    c = select_rows(scores, 40, "wtacrs")
    assert torch.equal(a.index, b.index) and torch.equal(a.scale, b.scale)
    assert not torch.equal(a.index, c.index)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown sampling method"):
        select_rows(torch.rand(10), 3, "random")
