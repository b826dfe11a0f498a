"""The budget solver alone: exactness against brute force, feasibility, speed."""

import itertools
import random

import pytest

from wtacompile.solver import DEFAULT_MENU, GroupChoice, solve, variance_cost


def _random_groups(rng, n):
    groups = []
    for i in range(n):
        dense = rng.randint(50, 400)
        sampled = {r: int(dense * r) + rng.randint(0, 10) for r in DEFAULT_MENU[1:]}
        groups.append(GroupChoice(f"g{i}", dense, sampled, cost_weight=rng.uniform(0.1, 5.0)))
    return groups


def _brute_force(groups, capacity):
    best = None
    menus = [[(1.0, g.dense_bytes)] + [(r, b) for r, b in g.sampled_bytes.items() if b < g.dense_bytes]
             for g in groups]
    for combo in itertools.product(*menus):
        if sum(b for _, b in combo) > capacity:
            continue
        var = sum(variance_cost(g.cost_weight, r) for g, (r, _) in zip(groups, combo))
        if best is None or var < best - 1e-12:
            best = var
    return best


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    groups = _random_groups(rng, 4)
    total = sum(g.dense_bytes for g in groups)
    least = sum(min([g.dense_bytes, *g.sampled_bytes.values()]) for g in groups)
    capacity = int(least + (total - least) * rng.uniform(0.0, 0.9))  # feasible, not all exact
    solution = solve(groups, capacity, resolution=capacity)  # unit = 1 byte: exact
    assert solution.feasible and solution.bytes <= capacity
    assert solution.variance == pytest.approx(_brute_force(groups, capacity))


def test_everything_exact_when_it_fits():
    groups = _random_groups(random.Random(0), 5)
    solution = solve(groups, sum(g.dense_bytes for g in groups))
    assert solution.feasible and set(solution.ratios.values()) == {1.0} and solution.variance == 0


def test_never_samples_where_it_frees_nothing():
    useless = GroupChoice("useless", 100, {0.3: 120, 0.1: 100}, cost_weight=1.0)
    useful = GroupChoice("useful", 100, {0.3: 40}, cost_weight=1.0)
    solution = solve([useless, useful], 150, resolution=150)
    assert solution.ratios == {"useless": 1.0, "useful": 0.3}


def test_infeasible_budget_reports_minimum():
    groups = [GroupChoice("a", 100, {0.1: 20}, 1.0), GroupChoice("b", 100, {0.1: 30}, 1.0)]
    solution = solve(groups, 40)
    assert not solution.feasible and solution.min_bytes == 50


def test_prefers_sampling_cheap_variance_groups():
    cheap = GroupChoice("cheap", 100, {0.1: 10}, cost_weight=0.01)
    dear = GroupChoice("dear", 100, {0.1: 10}, cost_weight=100.0)
    solution = solve([cheap, dear], 120, resolution=120)
    assert solution.ratios == {"cheap": 0.1, "dear": 1.0}


def test_224_linears_fit_at_the_resolution():
    groups = _random_groups(random.Random(1), 224)
    capacity = int(sum(g.dense_bytes for g in groups) * 0.4)
    solution = solve(groups, capacity)
    assert solution.feasible and solution.bytes <= capacity
    assert any(r < 1.0 for r in solution.ratios.values())  # 40% of the bytes: must sample
