"""Keep ratios and the partitioner budget chosen together: the time model, the budget menu under
``mem_gb`` and ``plan()``, and what a plan carries to the compile."""

import copy
import json
import sys

import pytest
import torch

import wtacompile
from hf_models import PreNormMLP, build, saved_activation_bytes
from wtacompile import Plan, plan
from wtacompile.analysis.graph_cost import graph_cost, recompute_cost, with_recompute_of
from wtacompile.analysis.partition_trace import trace_partition
from wtacompile.config import WTAConfig
from wtacompile.memory import measure_training_step
from wtacompile.time_model import GraphCost, SampledLinear, sampling_change, step_time, step_time_ratio

AOT = {"inner": "aot_eager"}


def _batch4(batch):
    return {k: v.repeat(4, *([1] * (v.dim() - 1))) for k, v in batch.items()}


# --- the time model: arithmetic on hand-written numbers -------------------------------------


def test_sampling_change_counts_the_smaller_weight_gradients_and_the_draw():
    linear = SampledLinear(rows=100, in_features=8, itemsize=4, out_features=(16, 4))
    flops, nbytes = sampling_change(linear, kept_rows=30)
    assert flops == -(2 * 70 * 8 * 16 + 2 * 70 * 8 * 4)  # two dW GEMMs on 30 rows, not 100
    assert nbytes == 4 * 100 + 30 * (8 * 4 + 12) + 30 * 16 * 4 + 30 * 4 * 4
    assert sampling_change(linear, kept_rows=100)[0] == 0  # keeping every row saves no FLOP


def test_step_time_ratio_weighs_memory_traffic_by_the_machine_balance():
    dense = GraphCost(flops=1000.0, bytes=100.0)
    recompute = GraphCost(flops=1000.0, bytes=150.0)  # a lower partitioner budget: more traffic
    assert step_time((dense,), (), balance=2.0) == 1200.0
    assert step_time_ratio((recompute,), (), (dense,), balance=2.0) == pytest.approx(1300 / 1200)
    assert step_time_ratio((recompute,), (), (dense,), balance=0.0) == 1.0  # compute-bound device
    wide = SampledLinear(rows=100, in_features=64, itemsize=4, out_features=(64,))
    flops, nbytes = sampling_change(wide, 50)
    assert step_time((dense,), [(wide, 50)], balance=2.0) == 1200.0 + flops + 2.0 * nbytes < 1200.0
    narrow = SampledLinear(rows=10, in_features=5, itemsize=4, out_features=(10,))
    assert step_time((dense,), [(narrow, 5)], balance=2.0) > 1200.0  # the draw costs more than it saves


def test_graph_cost_counts_each_gemm_of_forward_and_backward():
    """An MLP whose input needs no gradient: 2 forward GEMMs, 2 weight-gradient GEMMs and one
    input-gradient GEMM (the hidden layer's), each 2·rows·in·out FLOPs."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(32, 8, bias=False))
    captured = []

    def backend(gm, inputs):
        captured.append(graph_cost(trace_partition(gm, WTAConfig(inner="aot_eager"))))
        return gm.forward

    torch.compile(model, backend=backend)(torch.randn(64, 16)).sum().backward()
    (cost,) = captured
    first, second = 2 * 64 * 16 * 32, 2 * 64 * 32 * 8
    assert cost.flops == 2 * first + 3 * second
    assert cost.bytes > 0 and sum(f for _, f, _ in cost.owners) == cost.flops


def test_recompute_cost_is_the_work_a_lower_budget_adds():
    """Three MLP blocks partitioned at budgets 1 and 0.2: the GEMMs that run once (forward,
    backward) are the same at both, so total FLOPs less recomputed FLOPs agree exactly, and
    swapping one split's recompute for the other's gives the other's FLOPs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[PreNormMLP() for _ in range(3)])
    splits = {}

    def backend(gm, inputs):
        for budget in (1.0, 0.2):
            splits[budget] = trace_partition(gm, WTAConfig(inner="aot_eager", activation_memory_budget=budget))
        return gm.forward

    torch.compile(model, backend=backend)(torch.randn(256, 64, requires_grad=True)).sum().backward()
    costs = {b: graph_cost(t) for b, t in splits.items()}
    recomputed = {b: recompute_cost(t) for b, t in splits.items()}
    assert recomputed[1.0].flops == 0 < recomputed[0.2].flops  # budget 0.2 recomputes GEMMs
    assert costs[1.0].flops - recomputed[1.0].flops == costs[0.2].flops - recomputed[0.2].flops
    swapped = with_recompute_of(costs[1.0], splits[1.0], splits[0.2])
    assert swapped.flops == costs[0.2].flops
    assert sum(f for _, f, _ in swapped.owners) == pytest.approx(swapped.flops)


@pytest.mark.parametrize("search", ["bisected", "from the top"])
def test_budget_search_answers_with_the_largest_success_and_only_a_success(search):
    from wtacompile.solver import first_fitting, largest_fitting

    find = largest_fitting if search == "bisected" else first_fitting
    menu = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    for threshold in (*menu, 0.95, 0.05):
        tried = []

        def fits(budget):
            tried.append(budget)
            return f"fits at {budget}" if budget <= threshold + 1e-9 else None

        found = find(menu, fits)
        expected = max((b for b in menu if b <= threshold + 1e-9), default=None)
        assert (found and found[0]) == expected
        if found:
            assert found[1] == f"fits at {expected}"
        else:
            assert tried[-1] == min(menu)  # nothing fits: the last try is the least recompute
        if search == "bisected":
            assert len(tried) <= 4  # ⌈log2(10)⌉
        else:
            assert tried == [b for b in menu if b >= (expected or 0)]  # one per budget down to it
    # Not monotone (the knapsack is lumpy): from the top finds the true largest; bisection may
    # settle lower, never on a failure.
    lumpy = (0.6, 0.5, 0.2, 0.1)
    found = find(menu, lambda b: b if b in lumpy else None)
    assert found is not None and found[0] in lumpy
    assert found[0] == 0.6 or search == "bisected"
    assert find((), lambda b: b) is None


def test_a_dense_answer_gives_way_to_sampling_lower_only_where_predicted_faster():
    """At 0.9 (the largest that fits) the graph stays dense. The next lower budget that fits is
    taken only if it samples and the time model says it is faster; nothing further down is tried,
    and nothing that does not fit is ever the answer."""
    from wtacompile.solver import fastest_fitting

    menu = (0.9, 0.8, 0.7, 0.6)

    def search(table):  # budget -> (samples, predicted time); absent: does not fit
        tried = []

        def attempt(budget):
            tried.append(budget)
            return table.get(budget)

        return fastest_fitting(menu, attempt, lambda r: r[0], lambda r: r[1]), tried

    assert search({0.9: (False, 1.0), 0.8: (True, 0.86)}) == ((0.8, (True, 0.86)), [0.9, 0.8])
    assert search({0.9: (False, 0.9), 0.8: (True, 0.95)})[0] == (0.9, (False, 0.9))  # slower: kept
    # 0.8 does not fit, 0.7 does and samples: the next lower budget that fits is 0.7.
    assert search({0.9: (False, 1.0), 0.7: (True, 0.9)})[0] == (0.7, (True, 0.9))
    # The next lower that fits stays dense too: stop there, keep the larger budget.
    found, tried = search({0.9: (False, 1.0), 0.8: (False, 1.1), 0.7: (True, 0.5)})
    assert found == (0.9, (False, 1.0)) and tried == [0.9, 0.8]
    # Nothing lower fits: the dense answer stands.
    assert search({0.9: (False, 1.0)})[0] == (0.9, (False, 1.0))
    # A sampling answer at the largest budget that fits is the answer: nothing lower is tried.
    found, tried = search({0.9: (True, 0.9), 0.8: (True, 0.5)})
    assert found == (0.9, (True, 0.9)) and tried == [0.9]
    assert search({})[0] is None


def test_the_ledger_puts_back_what_it_held():
    from wtacompile.compiled_models import BudgetLedger

    ledger, graph, other = BudgetLedger(), frozenset({1}), frozenset({2})
    empty = ledger.entry(graph)
    ledger.commit(other, 50, {"b": 0.3}, 0.7)
    ledger.commit(graph, 100, {"w": 0.5}, 0.8)
    held = ledger.entry(graph)
    ledger.commit(graph, 60, {"w": 0.1})  # another attempt, without a partitioner budget
    ledger.restore(graph, held)
    assert ledger.entry(graph) == held and ledger.earlier_partitioner_budget(graph) == 0.8
    assert ledger.earlier_ratios(graph) == {"w": 0.5} and ledger.committed_by_others(other) == 100
    ledger.restore(graph, empty)  # as before any commit: nothing of it left
    assert ledger.earlier_ratios(graph) == {} and ledger.earlier_partitioner_budget(graph) is None
    assert ledger.committed_by_others(other) == 0 and ledger.committed_by_others(graph) == 50


# --- options and plans carry the budget ------------------------------------------------------


@pytest.mark.parametrize("bad", [1.5, -0.1, True, "0.5"])
def test_activation_memory_budget_option_is_validated(bad):
    with pytest.raises(ValueError, match="activation_memory_budget must be a number in \\[0, 1\\]"):
        WTAConfig.from_options({"activation_memory_budget": bad})


def test_plan_sets_the_partitioner_budget_and_conflicts_with_one_given():
    base = Plan(mem_gb=1.0, fits=True, batch_size=2, seq_len=16, peak_bytes=10, baseline_peak_bytes=20,
                activation_bytes=5, baseline_activation_bytes=9, max_batch_size=4,
                baseline_max_batch_size=2, keep_ratios={"w": 0.3}, breakdown={},
                activation_memory_budget=0.5, predicted_step_time=0.97)
    config = WTAConfig.from_options({"plan": base})
    assert config.activation_memory_budget == 0.5 and dict(config.keep_ratios) == {"w": 0.3}
    with pytest.raises(ValueError, match="conflict"):
        WTAConfig.from_options({"plan": base, "activation_memory_budget": 1.0})
    assert Plan.from_json(base.to_json()) == base
    old = json.loads(base.to_json())  # a plan written before the budget existed: budget 1
    old["schema"] = "wtacompile.plan/1"
    del old["activation_memory_budget"], old["predicted_step_time"]
    read = Plan.from_json(json.dumps(old))
    assert read.activation_memory_budget == 1.0 and read.keep_ratios == {"w": 0.3}
    bad = json.loads(base.to_json())
    bad["activation_memory_budget"] = 2
    with pytest.raises(ValueError, match="activation_memory_budget must be in"):
        Plan.from_json(json.dumps(bad))


def test_plan_argument_activation_budgets_is_validated():
    model, batch = build("llama")
    with pytest.raises(ValueError, match="activation_memory_budget must be a number"):
        plan(model, 1.0, example_inputs=batch, activation_budgets=(1.0, 2.0))
    with pytest.raises(ValueError, match="at least one partitioner budget"):
        plan(model, 1.0, example_inputs=batch, activation_budgets=())


# --- one solver for memory and time ------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_budgets():
    """A tiny Llama at batch 8, and three plans: ample memory, the least peak sampling alone
    reaches, and the least with recompute too."""
    model, batch = build("llama")
    batch = _batch4(batch)
    ample = plan(model, 1.0, example_inputs=batch, inner="aot_eager")
    return model, batch, ample


def test_budget_dense_training_fits_stays_exact_at_partitioner_budget_1(llama_budgets):
    model, batch, ample = llama_budgets
    assert ample.fits and ample.keep_ratios == {}
    assert ample.activation_memory_budget == 1.0 and ample.predicted_step_time == pytest.approx(1.0)
    wtacompile.clear_reports()
    torch.compile(copy.deepcopy(model), backend="wtacrs", options=dict(AOT, mem_gb=1.0))(**batch)
    reports = [r for r in wtacompile.compile_reports() if r.training]
    assert reports and all(not r.sampled_sites and r.activation_memory_budget == 1.0 for r in reports)


def test_sampling_alone_first_then_recompute_when_it_cannot_fit(llama_budgets):
    model, batch, ample = llama_budgets
    # Between dense and sampling's least: sampling at partitioner budget 1 fits, and is faster.
    between = (ample.baseline_peak_bytes + ample.min_peak_bytes) / 2 / 1e9
    sampled = plan(model, between, example_inputs=batch, inner="aot_eager")
    assert sampled.fits and sampled.keep_ratios and sampled.activation_memory_budget == 1.0
    assert sampled.predicted_step_time < 1.0
    # Below sampling's least: only recompute (with sampling) fits.
    below = (ample.min_peak_bytes - 0.02 * (ample.baseline_peak_bytes - ample.min_peak_bytes)) / 1e9
    alone = plan(model, below, example_inputs=batch, inner="aot_eager", activation_budgets=(1.0,))
    assert not alone.fits
    joint = plan(model, below, example_inputs=batch, inner="aot_eager")
    assert joint.fits and joint.activation_memory_budget < 1.0, str(joint)
    # The least recompute that fits: the next budget up on the menu does not, or it fits only
    # dense and the joint plan is predicted faster (fastest_fitting).
    above = plan(model, below, example_inputs=batch, inner="aot_eager",  # both relative to dense at 1
                 activation_budgets=(1.0, round(joint.activation_memory_budget + 0.1, 1)))
    assert not above.fits or (not above.keep_ratios and joint.predicted_step_time < above.predicted_step_time)
    assert joint.peak_bytes <= below * 1e9 < alone.peak_bytes
    assert joint.baseline_peak_bytes == ample.baseline_peak_bytes  # baseline: dense at budget 1
    assert f"activation_memory_budget={joint.activation_memory_budget:g}" in str(joint)

    # The backend makes the same choice, and what it compiles saves what the plan predicts.
    wtacompile.clear_reports()
    torch._dynamo.reset()
    options = dict(AOT, mem_gb=below)
    saved, _ = measure_training_step(copy.deepcopy(model), batch, options)
    reports = [r for r in wtacompile.compile_reports() if r.training]
    assert {r.activation_memory_budget for r in reports} == {joint.activation_memory_budget}
    assert all(r.predicted_step_time is not None for r in reports)
    assert saved == pytest.approx(joint.activation_bytes, rel=0.05)
    # The plan, applied, compiles under its budget and saves the same.
    torch._dynamo.reset()
    saved_from_plan, _ = measure_training_step(copy.deepcopy(model), batch, dict(AOT, plan=joint))
    assert saved_from_plan == saved


def test_budget_nothing_meets_names_the_recompute_it_tried(llama_budgets, monkeypatch):
    model, batch, ample = llama_budgets
    b = ample.breakdown
    state_alone = b["parameters"] + b["gradients"] + b["optimizer"] + b["step_temporaries"]
    # Room for the optimizer step, none for activations: every partitioner budget is tried.
    squeezed = (state_alone + 1) / 1e9
    assert not plan(model, squeezed, example_inputs=batch, inner="aot_eager").fits
    traces = []
    partition_trace = sys.modules["wtacompile.analysis.partition_trace"]
    real_trace = partition_trace.aot_trace
    monkeypatch.setattr(partition_trace, "aot_trace", lambda *a, **k: traces.append(1) or real_trace(*a, **k))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                       match="activation_memory_budget 0.1") as info:
        torch.compile(copy.deepcopy(model), backend="wtacrs", options=dict(AOT, mem_gb=squeezed))(**batch)
    assert isinstance(info.value.inner_exception, ValueError)
    # Ten budgets tried, three joint graphs traced: the dense one, the sampled one at budget 1
    # (norm-only scores, at the traced sizes), the sampled one below it; every other budget
    # splits those again.
    assert len(traces) == 3
    # Parameters and optimizer state alone over the budget: no recompute can help, none is tried.
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="activation_memory_budget 1\\b"):
        torch.compile(copy.deepcopy(model), backend="wtacrs", options=dict(AOT, mem_gb=1e-6))(**batch)


def test_a_global_partitioner_budget_is_respected_not_searched():
    from wtacompile.backend import partitioner_menu
    from wtacompile.solver import DEFAULT_BUDGET_MENU

    searching = WTAConfig(mem_gb=1.0)
    assert partitioner_menu(searching) == DEFAULT_BUDGET_MENU
    assert partitioner_menu(WTAConfig()) == (None,)  # no memory budget: torch's setting
    assert partitioner_menu(WTAConfig(mem_gb=1.0, activation_memory_budget=0.7)) == (0.7,)
    with torch._functorch.config.patch(activation_memory_budget=0.9):
        assert partitioner_menu(searching) == (None,)  # the user chose one: not overridden


# --- a budget the user sets: met in bytes, with less recompute ---------------------------------


def test_raised_budgets_are_tried_only_for_a_budget_the_user_set():
    from wtacompile.passes.analyze_savings import raised_budgets

    assert raised_budgets(WTAConfig(activation_memory_budget=0.7)) == (1.0, 0.9, 0.8)
    assert raised_budgets(WTAConfig(activation_memory_budget=0.95)) == (1.0,)
    with torch._functorch.config.patch(activation_memory_budget=0.5):  # torch's global counts too
        assert raised_budgets(WTAConfig()) == (1.0, 0.9, 0.8, 0.7, 0.6)
    assert raised_budgets(WTAConfig(activation_memory_budget=0.7, match_budget_bytes=False)) == ()
    assert raised_budgets(WTAConfig(activation_memory_budget=0.7, mem_gb=1.0)) == ()  # fits its own bytes
    assert WTAConfig.from_options({"plan": Plan(
        mem_gb=1.0, fits=True, batch_size=2, seq_len=16, peak_bytes=10, baseline_peak_bytes=20,
        activation_bytes=5, baseline_activation_bytes=9, max_batch_size=4, baseline_max_batch_size=2,
        keep_ratios={"w": 0.3}, breakdown={}, activation_memory_budget=0.5)}).match_budget_bytes is False
    with pytest.raises(ValueError, match="match_budget_bytes must be True or False"):
        WTAConfig.from_options({"match_budget_bytes": "yes"})


def test_a_budget_the_user_sets_is_met_in_bytes_with_less_recompute():
    """A partitioner budget is a fraction of each graph's own range of saved bytes, and sampling
    shrinks the range: at the user's budget B the sampled partition recomputes down to fewer bytes
    than B's dense partition. So it is compiled at the largest budget above B that still saves no
    more than that (three MLP blocks at 0.5: 0.7), measured, and the same as asking for 0.7
    outright — the analysis partitioned a copy of the joint graph, the compile the graph itself."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[PreNormMLP() for _ in range(3)])
    x = torch.randn(512, 64, requires_grad=True)
    saved, reports = {}, {}
    with torch._functorch.config.patch(activation_memory_budget=0.5):
        for name, options in (("dense", dict(AOT, keep_ratio=1.0)),
                              ("at 0.5", dict(AOT, match_budget_bytes=False)),
                              ("matched", AOT)):
            wtacompile.clear_reports()
            saved[name] = saved_activation_bytes(model, x, options)
            reports[name] = [r for r in wtacompile.compile_reports() if r.training]
    (matched,), (at_budget,) = reports["matched"], reports["at 0.5"]
    assert matched.activation_memory_budget == 0.7 and matched.raised_from == 0.5, str(matched)
    assert "raised from 0.5" in str(matched) and len(matched.sampled_sites) == 6
    assert at_budget.raised_from is None and len(at_budget.sampled_sites) == 6
    assert saved["at 0.5"] < saved["matched"] <= saved["dense"]
    outright = saved_activation_bytes(model, x, dict(AOT, activation_memory_budget=0.7, match_budget_bytes=False))
    assert outright == saved["matched"]


def test_a_model_training_with_dropout_is_planned_below_budget_1():
    """Below budget 1 the analysis runs Inductor's joint-graph passes, whose rewrite of a
    dropout's seeds enters the compile's fake mode (a model with dropout crashed there before)."""
    model, batch = build("bert")
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    exact = plan(model, 1.0, example_inputs=batch, activation_budgets=(1.0,))
    recomputed = plan(model, 1.0, example_inputs=batch, activation_budgets=(0.3,))
    assert recomputed.fits and recomputed.activation_memory_budget == 0.3
    assert not exact.keep_ratios and recomputed.activation_bytes < exact.activation_bytes  # recompute saves less
