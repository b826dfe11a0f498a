"""Each pass on its own: values in, values out (the backend tests cover them end to end)."""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wtacompile import Plan, WTAConfig
from wtacompile.lower import compile_graph
from wtacompile.memory_model import GraphMemory, Size, compact_bytes
from wtacompile.passes import ANALYSIS_PASSES, PIPELINE, CompileState, choose_ratios, run_passes
from wtacompile.passes.choose_ratios import MIN_OUTPUTS_FOR_SPEED
from wtacompile.plan_result import PLAN_SCHEMA, LayerPlan
from wtacompile.sites import ADDS_MEMORY, FREES, FREES_NOTHING, InputGroup, LinearSite, SavingsAnalysis


def _site(weight, rows=100, in_features=32, requested=0.3, trainable=True):
    return LinearSite(node=weight.replace(".", "_"), weight=weight, op="linear", weight_layout="out_in",
                      input_shape=(rows, in_features), dtype="float32", itemsize=4, rows=rows,
                      in_features=in_features, out_features=16, input_bytes=rows * in_features * 4,
                      weight_requires_grad=trainable, requested_ratio=requested)


def _state(sites, groups, untraced=(), **config):
    analysis = SavingsAnalysis(tuple(groups), tuple(untraced), GraphMemory(Size(10**6), ()))
    return CompileState(WTAConfig(**config), (), tuple(sites), analysis)


def test_choose_ratios_from_values():
    q, k, v = _site("q"), _site("k"), _site("v")
    alone = _site("alone", requested=0.1)
    narrow, wide = _site("narrow"), _site("wide")
    wide = dataclasses.replace(wide, out_features=MIN_OUTPUTS_FOR_SPEED)
    kept, gathered = _site("kept"), dataclasses.replace(_site("gathered"), out_features=MIN_OUTPUTS_FOR_SPEED)
    frozen, excluded = _site("frozen", trainable=False), _site("excluded", requested=None)
    gone = _site("gone")
    input_bytes = 100 * 32 * 4
    state = _state(
        [q, k, v, alone, narrow, wide, kept, gathered, frozen, excluded, gone],
        [InputGroup("h", ("q", "k", "v"), Size(input_bytes), FREES, "saved only for them"),
         InputGroup("a", ("alone",), Size(input_bytes), FREES, "saved only for it"),
         InputGroup("n", ("narrow",), Size(input_bytes), FREES_NOTHING, "recomputed"),
         InputGroup("w", ("wide",), Size(input_bytes), FREES_NOTHING, "recomputed"),
         InputGroup("s", ("kept",), Size(input_bytes), ADDS_MEMORY, "kept for another backward"),
         InputGroup("g", ("gathered",), Size(input_bytes), ADDS_MEMORY, "kept for another backward",
                    input_saved=True)],
        untraced=("gone",),
    )
    decisions = choose_ratios(None, state).decisions
    assert list(decisions) == ["q", "k", "v", "alone", "narrow", "wide", "kept", "gathered", "frozen",
                               "excluded", "gone"]
    # An input saved anyway, read by wide enough linears: sampled for speed, rows gathered in backward.
    assert (decisions["gathered"].sampled, decisions["gathered"].rows_in_backward) == (True, True)
    assert state.decisions == {} and choose_ratios(None, state).rows_in_backward == {"gathered"}
    assert not any(decisions[w].rows_in_backward for w in decisions if w != "gathered")
    # q/k/v share one compact copy of 30 of the 100 rows.
    freed = input_bytes - compact_bytes(100, 32, 4, 0.3, 10)
    assert [(decisions[w].sampled, decisions[w].keep_ratio, decisions[w].freed_bytes) for w in "qkv"] == [
        (True, 0.3, freed // 3)] * 3
    assert decisions["q"].reason == "saved only for them (input shared by 3 linears)"
    assert decisions["alone"].keep_ratio == 0.1
    assert decisions["alone"].freed_bytes == input_bytes - compact_bytes(100, 32, 4, 0.1, 10)
    # Memory-neutral inputs are sampled only where the GEMMs are wide enough to pay.
    assert (decisions["wide"].sampled, decisions["wide"].freed_bytes) == (True, 0)
    assert not decisions["narrow"].sampled and "too narrow" in decisions["narrow"].reason
    assert {w: decisions[w].verdict for w in ("narrow", "wide", "kept", "frozen", "excluded", "gone")} == {
        "narrow": FREES_NOTHING, "wide": FREES_NOTHING, "kept": ADDS_MEMORY, "frozen": "skipped",
        "excluded": "skipped", "gone": FREES_NOTHING}
    assert not any(decisions[w].sampled for w in ("kept", "frozen", "excluded", "gone"))
    assert state.decisions == {}  # the input state is untouched


def test_choose_ratios_declines_rows_that_outweigh_the_input():
    sites = [_site(n, rows=10) for n in ("q", "k", "v")]  # min_rows keeps all 10 rows
    state = _state(sites, [InputGroup("h", ("q", "k", "v"), Size(10 * 32 * 4), FREES, "saved")])
    decisions = choose_ratios(None, state).decisions
    assert all(d.verdict == ADDS_MEMORY and not d.sampled for d in decisions.values())
    assert decisions["q"].reason.startswith("the compact rows would outweigh")


def test_linears_sharing_an_input_take_the_largest_ratio():
    sites = [_site("q", requested=0.1), _site("k", requested=0.5)]
    state = _state(sites, [InputGroup("h", ("q", "k"), Size(100 * 32 * 4), FREES, "saved")])
    assert choose_ratios(None, state).ratios == {"q": 0.5, "k": 0.5}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.down(F.gelu(self.mid(self.norm(self.up(x)))))


def _run(model, x, passes, **options):
    states = []

    def backend(gm, inputs):
        config = WTAConfig(inner="aot_eager", **options)
        states.append(run_passes(gm, CompileState(config, tuple(inputs)), passes))
        return compile_graph(gm, inputs, config, None)  # what runs a rewritten graph

    torch.compile(model, backend=backend)(x).sum().backward()
    return states[0]


def test_analysis_passes_give_names_and_bytes_and_leave_the_graph_alone():
    state = _run(MLP(), torch.randn(64, 16), ANALYSIS_PASSES)
    assert state.decisions == {}
    groups = {g.weights: g for g in state.analysis.groups}
    assert set(groups) == {("up.weight",), ("mid.weight",), ("down.weight",)}
    assert all(isinstance(g.root, str) and g.verdict == FREES for g in groups.values())
    assert groups[("mid.weight",)].input_bytes.traced == 64 * 32 * 4
    # Nothing in the analysis holds on to graph nodes.
    for value in dataclasses.astuple(state.analysis):
        assert not isinstance(value, torch.fx.Node)


def test_pipeline_order_and_one_signature():
    assert [p.__name__ for p in PIPELINE] == ["find_linears", "analyze_savings", "choose_ratios",
                                              "rewrite_sampled"]
    state = _run(MLP(), torch.randn(64, 16), PIPELINE, keep_ratio=0.3)
    assert state.ratios == {"up.weight": 0.3, "mid.weight": 0.3, "down.weight": 0.3}


def _plan_json(**changes):
    plan = Plan(mem_gb=1.0, fits=True, batch_size=2, seq_len=16, peak_bytes=10, baseline_peak_bytes=20,
                activation_bytes=5, baseline_activation_bytes=15, max_batch_size=4,
                baseline_max_batch_size=2, keep_ratios={"a.weight": 0.3}, breakdown={"parameters": 1},
                layers=(LayerPlan("a.weight", 4, 4, 32, 100, 30, 0.3, ""),))
    import json

    data = json.loads(plan.to_json())
    data.update(changes)
    return plan, json.dumps(data)


def test_plan_json_roundtrip_and_schema():
    plan, text = _plan_json()
    assert Plan.from_json(text) == plan and f'"schema": "{PLAN_SCHEMA}"' in text
    older = json.loads(text)  # a plan of schema /2 had no max_batch_reason
    older["schema"] = "wtacompile.plan/2"
    del older["max_batch_reason"]
    assert Plan.from_json(json.dumps(older)) == plan


@pytest.mark.parametrize("changes,match", [
    ({"schema": "wtacompile.plan/0"}, "schema"),
    ({"fits": "false"}, "'fits'"),
    ({"keep_ratios": {"a.weight": 1.5}}, r"keep_ratios\['a.weight'\]"),
    ({"mem_gb": None}, "'mem_gb'"),
    ({"surprise": 1}, "unknown field"),
    ({"layers": [{"weight": "a"}]}, "missing field"),
])
def test_plan_json_rejects_edited_or_corrupted_files(changes, match):
    _, text = _plan_json(**changes)
    with pytest.raises(ValueError, match=match):
        Plan.from_json(text)
    with pytest.raises(ValueError, match="invalid JSON"):
        Plan.from_json(text[:-5])


@pytest.mark.parametrize("family,budget", [("llama", 1.0), ("bert", 0.5)])
def test_faster_min_cut_partitions_exactly_like_the_default(family, budget):
    """Boykov–Kolmogorov's max flow gives torch's partitioner the very split its default
    (preflow-push) does, at budget 1 and through the knapsack's repeated cuts below it."""
    import networkx as nx
    from hf_models import build
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from wtacompile._compat import aot_trace
    from wtacompile.lower import faster_min_cut

    model, batch = build(family)
    splits, cuts = {False: [], True: []}, []
    default = nx.minimum_cut

    def counting(*args, **kwargs):
        cuts.append(kwargs.get("flow_func"))
        return default(*args, **kwargs)

    def backend(gm, _inputs):
        for fast in (False, True):
            def partition(joint, joint_inputs, **kwargs):
                fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, compiler="inductor", **kwargs)
                splits[fast].append((fw.code, bw.code))
                return fw, bw

            with torch._functorch.config.patch(activation_memory_budget=budget):
                if fast:
                    with faster_min_cut():
                        aot_trace(gm, partition)
                    assert nx.minimum_cut is counting  # put back on leaving
                else:
                    aot_trace(gm, partition)
        return gm.forward

    nx.minimum_cut = counting
    try:
        torch.compile(model, backend=backend)(**batch)
    finally:
        nx.minimum_cut = default
    assert nx.algorithms.flow.boykov_kolmogorov in cuts and None in cuts  # both ran
    assert splits[True] and splits[True] == splits[False]  # every graph's split


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "llama", "opt", "vit"])
def test_verdict_trace_without_the_marker_reads_the_same_facts(family):
    """The verdict trace leaves the weight gradients' non-finite marker out (a backward read of
    dY): per sampled input, every fact the verdicts are read from is the same as with it, in a
    smaller joint graph (with and without bias: BERT/GPT-2/OPT/ViT's linears have one)."""
    from hf_models import build

    from wtacompile.analysis.partition_trace import trace_partition
    from wtacompile.passes.analyze_savings import _sample_facts, _sampled_graph
    from wtacompile.passes.find_linears import find_linears

    model, batch = build(family)
    config = WTAConfig(inner="aot_eager")
    compared = []

    def backend(gm, inputs):
        state = find_linears(gm, CompileState(config, tuple(inputs)))
        candidates = [s for s in state.sites if s.skip_reason is None]
        facts, sizes = [], []
        for marker in (True, None):  # None: as the verdict trace is made
            trial, rewritten = _sampled_graph(gm, candidates, config, False, nonfinite_marker=marker)
            split = trace_partition(trial, config, static=True)
            facts.append(_sample_facts(split, rewritten))
            sizes.append(len(split.joint.graph.nodes))
        compared.append((*facts, *sizes, len(candidates)))
        return gm.forward

    with torch.enable_grad():
        torch.compile(model, backend=backend)(**batch)
    compared = [c for c in compared if c[-1]]  # graphs with something to sample
    assert compared
    for with_marker, without, nodes_with, nodes_without, candidates in compared:
        assert with_marker and with_marker == without
        assert nodes_without < nodes_with - 2 * candidates  # the marker really left out
