"""plan() reuses an earlier plan's analysed graphs only where nothing that shapes them changed."""

import sys

import pytest
import torch

from hf_models import build
from wtacompile import plan
from wtacompile.planning import trace_cache

AOT = {"inner": "aot_eager"}


@pytest.fixture
def captures(monkeypatch):
    """How many times plan() traced a model through dynamo (each call of the planner's capture:
    from a few blocks, or the whole model)."""
    module = sys.modules["wtacompile.planning.plan"]
    calls = []
    for name in ("_capture", "capture_graphs"):
        real = getattr(module, name)

        def counted(*args, real=real, **kwargs):
            calls.append(args[2:])
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    trace_cache.clear()
    yield calls
    trace_cache.clear()


def test_another_budget_reuses_the_graphs_and_plans_as_a_fresh_trace(captures):
    model, batch = build("llama")
    generous = plan(model, 1.0, example_inputs=batch, **AOT)
    assert generous.fits and not generous.keep_ratios
    budget = (generous.baseline_peak_bytes + generous.min_peak_bytes) / 2 / 1e9
    tight = plan(model, budget, example_inputs=batch, **AOT)
    assert len(captures) == 1  # traced once for both
    assert tight.keep_ratios and tight.peak_bytes <= budget * 1e9
    fresh = plan(model, budget, example_inputs=batch, reuse_traces=False, **AOT)
    assert len(captures) == 2
    assert fresh == tight
    # Equal inputs made anew (another tensor, same values) are the same inputs.
    plan(model, budget, example_inputs={k: v.clone() for k, v in batch.items()}, **AOT)
    assert len(captures) == 2


def _freeze_embeddings(model, batch):
    model.get_input_embeddings().weight.requires_grad_(False)
    return batch


def _eval_mode(model, batch):
    model.eval()
    return batch


def _longer_inputs(model, batch):
    return {k: torch.cat([v, v], dim=1) for k, v in batch.items()}


def _other_values(model, batch):
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -4:] = 0  # padding: Hugging Face's attention takes another path than without
    return dict(batch, attention_mask=mask)


def _checkpointing(model, batch):
    model.gradient_checkpointing_enable()
    return batch


def _cast(model, batch):
    model.to(torch.bfloat16)
    return batch


@pytest.mark.parametrize("change", [_freeze_embeddings, _eval_mode, _longer_inputs, _other_values,
                                    _checkpointing, _cast])
def test_a_changed_model_or_input_is_traced_again(captures, change):
    model, batch = build("llama")
    if change is _other_values:
        batch = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    plan(model, 1.0, example_inputs=batch, **AOT)
    batch = change(model, batch)
    plan(model, 1.0, example_inputs=batch, **AOT)
    assert len(captures) == 2, change.__name__


def test_other_settings_trace_again(captures):
    model, batch = build("llama")
    plan(model, 1.0, example_inputs=batch, **AOT)
    plan(model, 1.0, example_inputs=batch, min_rows=4, **AOT)  # another analysis setting
    plan(model, 1.0, example_inputs=batch, inner="inductor")  # another inner compiler's decompositions
    plan(model, 1.0, example_inputs=batch, compose_blocks=False, **AOT)
    assert len(captures) == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan(model, 1.0, example_inputs=batch, **AOT)
    assert len(captures) == 5


def test_reuse_traces_is_validated():
    model, batch = build("llama")
    with pytest.raises(ValueError, match="reuse_traces must be True or False"):
        plan(model, 1.0, example_inputs=batch, reuse_traces="yes")


def test_replaced_hooks_forwards_and_torch_settings_trace_again(captures):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, batch = build("llama")
    layer = model.model.layers[0]
    handle = layer.register_forward_hook(lambda module, args, out: None)
    plan(model, 1.0, example_inputs=batch, **AOT)
    handle.remove()
    layer.register_forward_hook(lambda module, args, out: None)  # another hook, same count
    plan(model, 1.0, example_inputs=batch, **AOT)
    assert len(captures) == 2
    with sdpa_kernel([SDPBackend.MATH]):  # the math kernel saves the attention probabilities
        plan(model, 1.0, example_inputs=batch, **AOT)
    assert len(captures) == 3
    with torch._functorch.config.patch(donated_buffer=not torch._functorch.config.donated_buffer):
        plan(model, 1.0, example_inputs=batch, **AOT)
    assert len(captures) == 4
    model.config._attn_implementation = "eager"
    plan(model, 1.0, example_inputs=batch, **AOT)
    assert len(captures) == 5

    def first(hidden_states, *args, **kwargs):
        return type(layer).forward(layer, hidden_states, *args, **kwargs)

    def second(hidden_states, *args, **kwargs):
        return type(layer).forward(layer, hidden_states, *args, **kwargs)

    layer.forward = first
    plan(model, 1.0, example_inputs=batch, **AOT)
    layer.forward = second
    plan(model, 1.0, example_inputs=batch, **AOT)
    assert len(captures) == 7
    layer.forward = first  # the very function of an earlier plan: reused
    plan(model, 1.0, example_inputs=batch, **AOT)
    assert len(captures) == 7


def test_merged_peft_adapters_trace_again(captures):
    from peft import LoraConfig, get_peft_model

    model, batch = build("llama")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert plan(model, 1.0, example_inputs=batch, **AOT).layers
    model.merge_adapter()  # the adapters leave the forward: nothing left to train
    with pytest.raises(ValueError, match="no training graph"):
        plan(model, 1.0, example_inputs=batch, **AOT)
    assert len(captures) == 2


def test_objects_told_apart_by_identity_must_be_the_very_ones():
    import gc

    from wtacompile.config import WTAConfig

    class Opaque:
        pass

    model, calls = torch.nn.Linear(2, 2), []

    def capture():
        calls.append(1)
        return []

    def key(obj):
        return lambda: trace_cache.trace_key(model, {"x": torch.ones(2), "options": obj}, WTAConfig(), None,
                                             True, "cpu")

    a = Opaque()
    assert trace_cache.cached_capture(model, key(a), capture) == ([], False)
    assert trace_cache.cached_capture(model, key(a), capture) == ([], True)
    trace_cache.cached_capture(model, key(Opaque()), capture)  # another object
    assert len(calls) == 2
    del a
    gc.collect()
    for _ in range(3):  # a new object at a freed one's address is still another object
        trace_cache.cached_capture(model, key(Opaque()), capture)
    assert len(calls) == 5
    sparse = torch.eye(2).to_sparse()  # a key that cannot be made: traced, nothing kept
    assert trace_cache.trace_key(model, {"x": sparse}, WTAConfig(), None, True, "cpu") is None
    trace_cache.clear()


@pytest.fixture
def aot_traces(monkeypatch):
    """How many times an analysis traced a graph through AOTAutograd."""
    module = sys.modules["wtacompile.analysis.partition_trace"]
    calls = []
    real = module.aot_trace

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "aot_trace", counted)
    return calls


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_budget_not_tried_before_splits_the_whole_models_joint_graphs_again(captures, aot_traces, family):
    """Below partitioner budget 1 the model is traced whole; a plan at another such budget reuses
    dynamo's graphs and the joint graphs traced from them, splits them at its own budget, and
    plans what a fresh trace at that budget plans."""
    model, batch = build(family)
    at_08 = plan(model, 1.0, example_inputs=batch, activation_budgets=(0.8,))
    assert len(captures) == 1 and len(aot_traces) == 2  # dense and all-sampled
    at_03 = plan(model, 1.0, example_inputs=batch, activation_budgets=(0.3,))
    assert len(captures) == 1 and len(aot_traces) == 2  # split again, not traced again
    assert at_03.activation_memory_budget == 0.3
    assert at_03.breakdown["activations"] < at_08.breakdown["activations"]  # another split indeed
    fresh = plan(model, 1.0, example_inputs=batch, activation_budgets=(0.3,), reuse_traces=False)
    assert len(captures) == 2 and len(aot_traces) == 4
    assert fresh == at_03


def test_a_checkpointed_model_is_split_again_as_in_its_trace(captures, aot_traces):
    """The partitioner reads the tracing state it ran in (its RNG functionalisation of a
    checkpointed region's dropout needs the fake mode): a reused joint graph is split in the
    state of its trace, and plans what a fresh trace plans. (Inductor's joint-graph passes, run
    below budget 1, enter the fake mode too: they rewrite a dropout's seeds.)"""
    model, batch = build("bert")
    model.train()
    model.gradient_checkpointing_enable()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    plan(model, 1.0, example_inputs=batch, activation_budgets=(0.8,))
    traced = len(aot_traces)
    reused = plan(model, 1.0, example_inputs=batch, activation_budgets=(0.5,))
    assert len(aot_traces) == traced and len(captures) == 1
    assert reused == plan(model, 1.0, example_inputs=batch, activation_budgets=(0.5,), reuse_traces=False)
