"""wtacompile.plan(): the memory model against measured reality, the Plan object, the CLI."""

import copy
import re

import pytest
import torch

import wtacompile
from hf_models import build
from wtacompile import Plan, plan
from wtacompile.memory import measure_peak_bytes, measure_training_step

AOT = {"inner": "aot_eager"}


def _batch4(batch):
    return {k: v.repeat(4, *([1] * (v.dim() - 1))) for k, v in batch.items()}


def _measure(model, batch, options):
    """(saved-activation bytes, peak bytes) of one AdamW training step, measured."""
    return measure_training_step(model, batch, options)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5", "vit"])
def test_predictions_match_measured_step(family):
    model, batch = build(family)
    batch = _batch4(batch)
    generous = plan(model, 1.0, example_inputs=batch, inner="aot_eager")
    assert generous.fits and generous.keep_ratios == {}  # ample memory: everything exact
    saved, peak = _measure(copy.deepcopy(model), batch, dict(AOT, keep_ratio=1.0))
    assert generous.baseline_activation_bytes == pytest.approx(saved, rel=0.05)
    assert generous.baseline_peak_bytes == pytest.approx(peak, rel=0.10)

    assert generous.min_peak_bytes < generous.baseline_peak_bytes
    budget = (generous.baseline_peak_bytes + generous.min_peak_bytes) / 2 / 1e9
    tight = plan(model, budget, example_inputs=batch, inner="aot_eager")
    assert tight.fits and tight.keep_ratios, str(tight)
    assert tight.peak_bytes <= budget * 1e9 < tight.baseline_peak_bytes
    saved, peak = _measure(copy.deepcopy(model), batch, dict(AOT, plan=tight))
    assert tight.activation_bytes == pytest.approx(saved, rel=0.05)
    assert tight.peak_bytes == pytest.approx(peak, rel=0.10)


def test_plan_object_roundtrip_and_report():
    model, batch = build("bert")
    result = plan(model, 0.0012, example_inputs=_batch4(batch), inner="aot_eager")
    again = Plan.from_json(result.to_json())
    assert again == result
    text = str(result)
    for needle in ("bert.encoder.layer.0.attention.self.query.weight", "predicted peak",
                   "largest batch that fits", "optimizer"):
        assert needle in text
    assert result.max_batch_size >= result.baseline_max_batch_size


def test_unmeetable_budget_says_so_plainly():
    model, batch = build("llama")
    result = plan(model, 1e-6, example_inputs=batch, inner="aot_eager")
    assert not result.fits and result.max_batch_size == 0
    assert "Does not fit" in result.advice
    assert re.search(r"needs at least [1-9][\d.]* (GB|MB|kB)", result.advice)  # never "0.0 GB"
    assert "DOES NOT FIT" in str(result)


def test_batch_search_without_batch_size():
    model, _ = build("llama")
    result = plan(model, 0.005, seq_len=16, inner="aot_eager")
    assert result.max_batch_size >= result.baseline_max_batch_size >= 1
    assert result.batch_size == result.max_batch_size
    # One past the largest, traced for real at that batch, does not fit with sampling alone (the
    # search's partitioner budget, 1); recomputing more makes room for it.
    bigger = plan(model, 0.005, batch_size=result.max_batch_size + 1, seq_len=16, inner="aot_eager",
                  activation_budgets=(1.0,))
    assert not bigger.fits
    recomputing = plan(model, 0.005, batch_size=result.max_batch_size + 1, seq_len=16, inner="aot_eager")
    assert recomputing.fits and recomputing.activation_memory_budget < 1.0


def test_meta_model_allocates_nothing_and_lora_counts_only_adapters():
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504,
                         num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    results = []
    peak = measure_peak_bytes(lambda: results.append(plan(model, 24, batch_size=1, seq_len=512)))
    (full,) = results
    assert peak < 64 * 2**20  # the parameters alone would be 680 MB, their gradients as much
    params = sum(p.numel() * 4 for p in model.parameters())
    assert full.breakdown["parameters"] == params and full.breakdown["gradients"] == params

    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    lora = plan(model, 24, batch_size=1, seq_len=512)
    adapters = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert lora.breakdown["gradients"] == adapters and lora.breakdown["optimizer"] == 2 * adapters
    names = {name for name, _ in model.named_parameters()}
    assert any(".lora_A." in layer.weight for layer in lora.layers)
    assert all(layer.weight.split("#")[0] in names for layer in lora.layers)  # PEFT's own names


def test_default_inputs_turn_the_kv_cache_off_through_a_peft_wrapper():
    """PEFT's forward takes **kwargs; without use_cache=False passed through it, the wrapped
    model builds a KV cache of every layer inside the traced training step."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from wtacompile.planning import default_example_inputs

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg)
    assert default_example_inputs(model, 2, 8)["use_cache"] is False
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    inputs = default_example_inputs(wrapped, 2, 8, device="cpu")
    assert inputs["use_cache"] is False and "labels" in inputs
    assert wrapped(**inputs).past_key_values is None


def test_backend_mem_gb_option():
    model, batch = build("llama")
    batch = _batch4(batch)
    reference = plan(model, 1.0, example_inputs=batch, inner="aot_eager")
    torch._dynamo.reset()
    wtacompile.clear_reports()
    torch.compile(copy.deepcopy(model), backend="wtacrs", options=dict(AOT, mem_gb=1.0))(**batch)
    assert not any(r.sampled_sites for r in wtacompile.compile_reports())  # fits exact
    tight = (reference.baseline_peak_bytes + reference.min_peak_bytes) / 2 / 1e9
    torch._dynamo.reset()
    wtacompile.clear_reports()
    torch.compile(copy.deepcopy(model), backend="wtacrs", options=dict(AOT, mem_gb=tight))(**batch)
    assert any(r.sampled_sites for r in wtacompile.compile_reports())
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="cannot be met") as info:
        torch.compile(copy.deepcopy(model), backend="wtacrs", options=dict(AOT, mem_gb=1e-6))(**batch)
    assert isinstance(info.value.inner_exception, ValueError)


def test_plan_option_conflicts():
    with pytest.raises(ValueError, match="conflict"):
        wtacompile.WTAConfig.from_options({"plan": "{}", "keep_ratio": 0.3})


def test_cli(tmp_path, capsys):
    from wtacompile.cli import main

    out = tmp_path / "plan.json"
    code = main(["plan", "llama", "--mem-gb", "0.05", "--seq-len", "64", "--dtype", "fp32",
                 "--set", "hidden_size=64", "--set", "intermediate_size=128",
                 "--set", "num_hidden_layers=2", "--set", "num_attention_heads=4",
                 "--set", "num_key_value_heads=4", "--set", "vocab_size=256", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "largest batch that fits" in printed
    assert Plan.from_json(out.read_text()).fits


def test_cli_sweeps_several_budgets_over_one_trace(tmp_path, capsys, monkeypatch):
    from wtacompile.cli import main
    from wtacompile.planning import trace_cache

    tiny = ["llama", "--seq-len", "64", "--dtype", "fp32", "--set", "hidden_size=64",
            "--set", "intermediate_size=128", "--set", "num_hidden_layers=2", "--set", "num_attention_heads=4",
            "--set", "num_key_value_heads=4", "--set", "vocab_size=256", "--no-recompute"]
    captured = []
    real = trace_cache.cached_capture

    def counting(model, key, capture):
        states, reused = real(model, key, capture)
        captured.append(reused)
        return states, reused

    monkeypatch.setattr(trace_cache, "cached_capture", counting)
    code = main(["plan", *tiny, "--mem-gb", "0.02", "0.05"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["0.02"], ["0.05"])]
    assert code == 0 and [line[:2] for line in lines] == [["0.02", "yes"], ["0.05", "yes"]]
    assert int(lines[0][2]) < int(lines[1][2])  # a larger budget, a larger batch
    assert captured == [False, True]  # traced once, reused for the second budget
    with pytest.raises(SystemExit) as error:  # one plan to write, two asked for
        main(["plan", *tiny, "--mem-gb", "0.02", "0.05", "--json", str(tmp_path / "p.json")])
    assert error.value.code == 2 and "give one --mem-gb" in capsys.readouterr().err


def test_llama_7b_shaped_plan():
    """A full-size plan on a meta model (its time is in benchmarks/bench_planner_speed.py, not here)."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    result = plan(model, 80, batch_size=1, seq_len=2048)
    assert result.breakdown["parameters"] == sum(p.numel() * 2 for p in model.parameters())
    assert len(result.layers) == 32 * 7 + 1
