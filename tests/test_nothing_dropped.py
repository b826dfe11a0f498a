"""Nothing silently dropped: dynamic shapes, checkpointing, one budget per model, every setting
used or refused, plan() leaving compiled code alone, non-finite gradients carried to dW."""

import copy
import gc
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import wtacompile
from wtacompile import WTAConfig, plan
from wtacompile.compiled_models import _LEDGERS, owning_model
from hf_models import build

AOT = {"inner": "aot_eager"}


def _decisions(reports):
    return {s.weight: (s.verdict, s.sampled) for r in reports if r.training for s in r.sites}


def _same_or_only_floored(dynamic, static, static_reports):
    """Dynamic decisions equal static ones, except where the static graph declined only because
    its N was under min_rows (rows would outweigh the input): one dynamic graph serves larger N."""
    floored = {s.weight for r in static_reports if r.training for s in r.sites if "outweigh" in s.reason}
    assert dynamic.keys() == static.keys()
    for weight, decision in dynamic.items():
        assert decision == static[weight] or (weight in floored and decision[1]), weight


def _bert_at(batch, length):
    return {k: v[:, :length] if k != "labels" else v for k, v in batch.items()}


# 1. dynamic shapes ---------------------------------------------------------------------------

def test_dynamic_true_samples_what_static_samples_without_graph_breaks():
    model, batch = build("bert")
    wtacompile.clear_reports()
    torch.compile(copy.deepcopy(model), backend="wtacrs", options=AOT)(**batch).loss.backward()
    static_reports = wtacompile.compile_reports()
    static = _decisions(static_reports)
    assert any(sampled for _, sampled in static.values())

    torch._dynamo.reset()
    counters.clear()
    wtacompile.clear_reports()
    compiled = torch.compile(copy.deepcopy(model), backend="wtacrs", options=AOT, dynamic=True)
    for length in (16, 12):
        compiled(**_bert_at(batch, length)).loss.backward()
    assert sum(counters["graph_break"].values()) == 0
    _same_or_only_floored(_decisions(wtacompile.compile_reports()), static, static_reports)


def test_automatic_dynamic_decisions_hold_for_every_length():
    """The recompile at a short length (N ≤ min_rows: every row kept at the traced size) must
    still sample what the static graph samples, since the same graph then serves long inputs."""
    model, batch = build("bert")
    wtacompile.clear_reports()
    compiled = torch.compile(model, backend="wtacrs", options=AOT)
    compiled(**batch).loss.backward()
    static_reports = wtacompile.compile_reports()
    static = _decisions(static_reports)
    wtacompile.clear_reports()
    compiled(**_bert_at(batch, 4)).loss.backward()  # 2 × 4 = 8 rows < min_rows: triggers dynamic
    reports = [r for r in wtacompile.compile_reports() if r.training]
    assert reports and any(s.dynamic_rows for r in reports for s in r.sites if s.sampled)
    _same_or_only_floored(_decisions(reports), static, static_reports)
    wtacompile.clear_reports()
    compiled(**_bert_at(batch, 11)).loss.backward()  # served by the dynamic graph
    assert not [r for r in wtacompile.compile_reports() if r.training]


def test_dynamic_graph_never_samples_where_the_rows_outweigh_the_input():
    """Per row the compact copy costs r·(D·itemsize + 8) bytes: at D = 4 fp32 and r = 0.9 that is
    21.6 > 16 bytes at every length, so the narrow input stays exact; the wide one is sampled."""
    class NarrowWide(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_in, self.narrow = nn.LayerNorm(4), nn.Linear(4, 64)
            self.norm, self.wide = nn.LayerNorm(64), nn.Linear(64, 4)

        def forward(self, x):  # LayerNorm outputs: saved only for the linears' weight gradients
            return self.wide(self.norm(self.narrow(self.norm_in(x))))

    wtacompile.clear_reports()
    compiled = torch.compile(NarrowWide(), backend="wtacrs", options=dict(AOT, keep_ratio=0.9),
                             dynamic=True)
    compiled(torch.randn(2, 5, 4)).sum().backward()  # 10 rows: min_rows keeps every row
    sites = {s.weight: s for s in wtacompile.last_compile_report().sites}
    assert sites["wide.weight"].dynamic_rows and sites["wide.weight"].sampled
    assert not sites["narrow.weight"].sampled and sites["narrow.weight"].verdict == "adds-memory"


def test_mem_gb_dynamic_recompile_keeps_the_longer_lengths_ratios():
    model, batch = build("llama")
    loose = plan(model, 1.0, example_inputs=batch, inner="aot_eager")
    tight = (loose.baseline_peak_bytes + loose.min_peak_bytes) / 2 / 1e9
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, mem_gb=tight))
    wtacompile.clear_reports()
    compiled(**batch).loss.backward()
    long_ratios = {s.weight: s.keep_ratio for s in wtacompile.last_compile_report().sites if s.sampled}
    assert long_ratios
    short = {k: v[:, :3] for k, v in batch.items()}  # the short last batch: recompiles dynamic
    compiled(**short).loss.backward()
    report = wtacompile.last_compile_report()
    assert any(s.dynamic_rows for s in report.sites)
    short_ratios = {s.weight: s.keep_ratio for s in report.sites if s.sampled}
    for weight, ratio in long_ratios.items():  # still sampled, no larger than at the long length
        assert weight in short_ratios and short_ratios[weight] <= ratio, weight


# 2. activation checkpointing -------------------------------------------------------------------

def test_gradient_checkpointing_is_reported_and_warned_and_stays_exact():
    model, batch = build("bert")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model)
    reference(**batch).loss.backward()
    wtacompile.clear_reports()
    with pytest.warns(UserWarning, match="activation-checkpointed"):
        torch.compile(model, backend="wtacrs", options=AOT)(**batch).loss.backward()
    sites = [s for r in wtacompile.compile_reports() if r.training for s in r.sites]
    inside = [s for s in sites if "encoder.layer" in s.weight]
    # Every encoder linear is listed, under the model's own names, and left exact with the reason.
    assert len(inside) == 12 and all(s.weight.startswith("bert.encoder.layer.") for s in inside)
    assert all(not s.sampled and "checkpointed" in s.reason for s in inside)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


# 3. one budget per model -----------------------------------------------------------------------

def test_mem_gb_budget_belongs_to_each_model():
    models = [build("llama"), build("qwen2")]
    refs = [plan(m, 1.0, example_inputs=b, inner="aot_eager") for m, b in models]
    tight = max((r.baseline_peak_bytes + r.min_peak_bytes) / 2 for r in refs) / 1e9
    options = dict(AOT, mem_gb=tight)

    alone = []
    for m, b in models:
        torch._dynamo.reset()
        wtacompile.clear_reports()
        torch.compile(copy.deepcopy(m), backend="wtacrs", options=options)(**b).loss.backward()
        alone.append(_decisions(wtacompile.compile_reports()))
    assert all(any(sampled for _, sampled in d.values()) for d in alone)

    torch._dynamo.reset()
    together = []
    for m, b in models:  # one process, same options, no reset between: no budget carried over
        wtacompile.clear_reports()
        torch.compile(copy.deepcopy(m), backend="wtacrs", options=options)(**b).loss.backward()
        together.append(_decisions(wtacompile.compile_reports()))
    assert together == alone


def test_ledger_is_dropped_with_its_model():
    gc.collect()  # models earlier tests left unreachable go first, not during the count below
    model = nn.Sequential(nn.Linear(4, 4))
    assert owning_model(model[0]) is model[0]  # a submodule seen first is its own model
    assert owning_model(model[0]) is model[0]
    n = len(_LEDGERS)
    del model
    gc.collect()
    assert len(_LEDGERS) == n - 1


# 4. no setting ignored ---------------------------------------------------------------------------

def test_plan_for_another_model_is_refused_by_name():
    bert, bert_batch = build("bert")
    llama, llama_batch = build("llama")
    loose = plan(bert, 1.0, example_inputs=bert_batch, inner="aot_eager")
    tight = (loose.baseline_peak_bytes + loose.min_peak_bytes) / 2 / 1e9
    bert_plan = plan(bert, tight, example_inputs=bert_batch, inner="aot_eager")
    assert bert_plan.fits and bert_plan.keep_ratios
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="has none of them") as info:
        torch.compile(llama, backend="wtacrs", options=dict(AOT, plan=bert_plan))(**llama_batch)
    assert isinstance(info.value.inner_exception, ValueError)
    assert "bert." in str(info.value) and "model.layers" in str(info.value)


def test_plan_made_on_the_bare_model_applies_under_a_wrapper():
    """A plan names ``up.weight``; under DDP-like wrappers the parameter is ``module.up.weight``:
    the ratios follow the parameter, not the spelling (before: every linear trained exact)."""
    class Wrapper(nn.Module):  # as DistributedDataParallel holds the model
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            return self.down(F.gelu(self.up(x)))

    wtacompile.clear_reports()
    options = dict(AOT, keep_ratio=1.0, keep_ratios={"up.weight": 0.25, "down.weight": 0.5})
    torch.compile(Wrapper(Two()), backend="wtacrs", options=options)(torch.randn(256, 16)).sum().backward()
    ratios = {s.weight: s.keep_ratio for s in wtacompile.last_compile_report().sites}
    assert ratios == {"module.up.weight": 0.25, "module.down.weight": 0.5}


def test_patterns_matching_no_parameter_warn():
    model, batch = build("llama")
    with pytest.warns(UserWarning, match="exclude pattern.*'layers.0.*'.*match no parameter"):
        torch.compile(model, backend="wtacrs", options=dict(AOT, exclude=["layers.0.*"]))(**batch)


def test_a_tied_head_answers_to_each_of_its_names():
    """GPT-2's head is its token embedding (tied): the site is named transformer.wte.weight, and
    include/exclude/keep_ratios written for lm_head.weight reach it (they used to pass the
    no-match check and be ignored)."""
    model, batch = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight

    def head_ratio(**options):
        torch._dynamo.reset()
        wtacompile.clear_reports()
        torch.compile(model, backend="wtacrs", options=dict(AOT, **options))(**batch)
        sites = {s.weight: s for r in wtacompile.compile_reports() if r.training for s in r.sites}
        return sites["transformer.wte.weight"].keep_ratio, len([s for s in sites.values() if s.sampled])

    ratio, sampled = head_ratio()
    assert ratio == 0.3 and sampled > 1  # sampled unless told otherwise
    assert head_ratio(exclude=["*lm_head*"])[0] is None  # not a candidate
    assert head_ratio(keep_ratios={"lm_head.weight": 1.0})[0] is None  # exact
    assert head_ratio(include=["lm_head.weight"]) == (0.3, 1)
    # plan() traces the model tied, as it trains: the same site name, the same patterns.
    planned = plan(model, 1.0, example_inputs=batch, inner="aot_eager", activation_budgets=(1.0,))
    assert "transformer.wte.weight" in [layer.weight for layer in planned.layers]
    assert "lm_head.weight" not in [layer.weight for layer in planned.layers]
    excluded = plan(model, 1.0, example_inputs=batch, inner="aot_eager", activation_budgets=(1.0,),
                    exclude=("*lm_head*",))
    assert "transformer.wte.weight" not in [layer.weight for layer in excluded.layers]
    assert WTAConfig(exclude=("*lm_head*",)).ratio_for("transformer.wte.weight", ("lm_head.weight",)) is None
    from wtacompile.eager import _name_filter  # eager mode (sample_linears) matches the same way

    assert not _name_filter(model, (), ("*lm_head*",))(model.lm_head.weight)
    assert _name_filter(model, ("lm_head.weight",), ())(model.transformer.wte.weight)
    assert WTAConfig(keep_ratios={"lm_head.weight": 0.5}).ratio_for("wte", ("lm_head.weight",)) == 0.5


@pytest.mark.parametrize("options, match", [
    ({"include": 5}, "include must be an fnmatch pattern"),
    ({"exclude": [1]}, "exclude must be an fnmatch pattern"),
    ({"keep_ratios": {"w": "0.5"}}, r"keep_ratios\['w'\]"),
    ({"keep_ratios": {"w": True}}, r"keep_ratios\['w'\]"),
    ({"keep_ratios": {"w": 1.5}}, r"keep_ratios\['w'\]"),
    ({"keep_ratios": [1, 2]}, "keep_ratios must map weight names"),
    ({"mem_gb": math.inf}, "positive, finite"),
    ({"mem_gb": True}, "positive, finite"),
    ({"mem_gb": "8"}, "positive, finite"),
    ({"report": "no"}, "report must be True or False"),
])
def test_bad_option_values_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        WTAConfig.from_options(options)


def test_one_pattern_string_is_one_pattern():
    assert WTAConfig.from_options({"include": "fc1*"}).include == ("fc1*",)
    assert WTAConfig(exclude="*head*").exclude == ("*head*",)


def test_eager_include_string_is_one_pattern():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    model = Two()
    x = torch.randn(256, 8)
    with wtacompile.SavedTensorMeter(model.parameters()) as dense:
        model(x)
    with (wtacompile.sample_linears(0.25, model=model, include="fc1*"),
          wtacompile.SavedTensorMeter(model.parameters()) as sampled):
        model(x)
    # Only fc1's input is sampled (the string is one pattern, not "f", "c", "1", "*"): its
    # 256 rows become 64 scaled rows and their int64 indices; fc2's input is kept whole. (Rows
    # of a 2-D input are all one cell for the gradient-aware scores: no cells are saved.)
    assert dense.activation_bytes - sampled.activation_bytes == 256 * 8 * 4 - (64 * 8 * 4 + 64 * 8)
    x3 = x.reshape(16, 16, 8)  # (B, T, D): the scores save each row's int32 cell as well
    with wtacompile.SavedTensorMeter(model.parameters()) as dense3:
        model(x3)
    with (wtacompile.sample_linears(0.25, model=model, include="fc1*"),
          wtacompile.SavedTensorMeter(model.parameters()) as sampled3):
        model(x3)
    assert dense3.activation_bytes - sampled3.activation_bytes == 256 * 8 * 4 - (64 * 8 * 4 + 64 * 8 + 256 * 4)
    with (wtacompile.sample_linears(0.25, model=model, include="fc1*", row_scores="norm"),
          wtacompile.SavedTensorMeter(model.parameters()) as norm_only):
        model(x)
    assert dense.activation_bytes - norm_only.activation_bytes == 256 * 8 * 4 - (64 * 8 * 4 + 64 * 8)


@pytest.mark.parametrize("argv, match", [
    (["--set", "hiden_size=32"], "no field 'hiden_size'"),
    (["--set", "oops"], "key=value"),
    (["--mem-gb", "nan"], "positive float"),
    (["--mem-gb", "-3"], "positive float"),
    (["--seq-len", "-4"], "positive int"),
    (["--batch-size", "0"], "positive int"),
    (["--set", "hidden_size=33", "--set", "num_attention_heads=2"], "not a multiple of the number of attention heads"),
    (["--task", "seq-cls"], "add --set pad_token_id=0"),
    (["--task", "image-cls"], "transformers cannot build this model from a LlamaConfig"),
])
def test_cli_usage_errors(argv, match, capsys):
    from wtacompile.cli import main

    args = ["plan", "llama", "--mem-gb", "8", *argv] if "--mem-gb" not in argv else ["plan", "llama", *argv]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


# 5. plan() leaves the user's compiled functions alone -------------------------------------------

def test_plan_does_not_recompile_user_functions():
    """The user compiled this very model; planning it (same code objects) leaves that alone."""
    model, batch = build("bert")
    counter = CompileCounter()
    user_model = torch.compile(model, backend=counter)
    with torch.no_grad():
        for _ in range(2):  # the first call sets config.problem_type: HF's own recompile
            user_model(**batch)
    compiled_before = counter.frame_count
    plan(model, 1.0, example_inputs=batch, inner="aot_eager")
    plan(model, 1.0, example_inputs=batch, inner="aot_eager")
    with torch.no_grad():
        user_model(**batch)
    assert counter.frame_count == compiled_before


# 6. bad input to the planning paths ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"mem_gb": math.nan}, "mem_gb must be a positive, finite"),
    ({"mem_gb": math.inf}, "mem_gb must be a positive, finite"),
    ({"mem_gb": "8"}, "mem_gb must be a positive, finite"),
    ({"mem_gb": 0}, "mem_gb must be a positive, finite"),
    ({"mem_gb": 8, "batch_size": 0}, "batch_size must be a positive int"),
    ({"mem_gb": 8, "batch_size": -2}, "batch_size must be a positive int"),
    ({"mem_gb": 8, "seq_len": -5}, "seq_len must be a positive int"),
    ({"mem_gb": 8, "example_inputs": {}}, "example_inputs holds no tensor"),
    ({"mem_gb": 8, "example_inputs": 3}, "example_inputs must be a dict"),
    ({"mem_gb": 8, "seq_len": 16, "include": 5}, "include must be an fnmatch pattern"),
])
def test_plan_bad_arguments(kwargs, match):
    model, _ = build("bert")
    with pytest.raises(ValueError, match=match):
        plan(model, **kwargs)


def test_plan_refuses_a_seq_len_its_example_inputs_contradict():
    model, batch = build("bert")
    length = batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match=f"seq_len={length + 1} but example_inputs have sequence length {length}"):
        plan(model, 1.0, seq_len=length + 1, example_inputs=batch, inner="aot_eager")


def test_plan_names_the_position_table_a_sequence_outgrows():
    model, _ = build("bert")  # 64 learned positions
    with pytest.raises(ValueError, match=r"longer than the model's position table .*position_embeddings \(64"):
        plan(model, 1.0, batch_size=2, seq_len=80, inner="aot_eager", activation_budgets=(1.0,))


def test_plan_says_when_the_largest_batch_is_the_search_limit():
    model, _ = build("bert")
    capped = plan(model, 1000.0, seq_len=16, max_batch=8, inner="aot_eager", activation_budgets=(1.0,))
    assert capped.max_batch_size == capped.baseline_max_batch_size == capped.max_batch == 8
    assert "the search stops at max_batch=8" in str(capped)
    assert wtacompile.Plan.from_json(capped.to_json()).max_batch == 8
    roomy = plan(model, 1000.0, seq_len=16, batch_size=4, inner="aot_eager", activation_budgets=(1.0,))
    assert roomy.max_batch_size == (1 << 16) and "search stops" in str(roomy)  # the default limit
    tight = plan(model, 1e-3, seq_len=16, inner="aot_eager", activation_budgets=(1.0,))
    assert 0 < tight.max_batch_size < tight.max_batch and "search stops" not in str(tight)
    from wtacompile.cli import sweep_table

    table = sweep_table([capped, tight]).splitlines()
    assert "8+ (8+)" in table[2] and "+" not in table[3]
    assert table[-1] == "+: the search stops at max_batch=8; larger batches may fit too"
    assert "+:" not in sweep_table([tight])


def test_plan_of_a_classifier_that_runs_batch_one_only():
    """A decoder's sequence classifier without a pad token refuses batches above 1 (transformers'
    own check): planned at batch 1 its largest batch is 1, and says why; any other batch, or the
    search, is refused before tracing with the fix. With a pad token the same model has no limit."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=3)
    assert cfg.pad_token_id is None
    model = tf.LlamaForSequenceClassification(cfg)
    with pytest.raises(ValueError) as info:
        model(input_ids=torch.zeros(2, 8, dtype=torch.long))
    assert "no padding token" in str(info.value)  # what batch_one_only recognises
    one = plan(model, 1.0, batch_size=1, seq_len=8, inner="aot_eager", activation_budgets=(1.0,))
    assert one.max_batch_size == one.baseline_max_batch_size == 1 and not one.largest_batch_capped
    assert "no batch above 1 runs: LlamaForSequenceClassification finds each row's last token" in str(one)
    assert wtacompile.planning.inputs.batch_one_only(torch.compile(model)) == one.max_batch_reason
    assert wtacompile.Plan.from_json(one.to_json()).max_batch_reason == one.max_batch_reason
    for kwargs in ({}, {"batch_size": 4}):
        with pytest.raises(ValueError, match="runs batch 1 only. Set its config's pad_token_id"):
            plan(model, 1.0, seq_len=8, inner="aot_eager", **kwargs)
    model.config.pad_token_id = 0
    padded = plan(model, 1.0, batch_size=1, seq_len=8, inner="aot_eager", activation_budgets=(1.0,))
    assert padded.max_batch_size > 1 and not padded.max_batch_reason


def test_plan_json_with_string_fits_is_refused():
    model, batch = build("bert")
    text = plan(model, 1.0, example_inputs=batch, inner="aot_eager").to_json()
    with pytest.raises(ValueError, match="'fits'"):
        wtacompile.Plan.from_json(text.replace('"fits": true', '"fits": "false"'))


# 7. non-finite upstream gradients reach dW ------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_grad_row_reaches_weight_grad(bad, with_bias):
    """Whichever rows are drawn, a non-finite dY entry makes dW non-finite, as dense dW would be:
    GradScaler then skips the step instead of applying a finite estimate."""
    for trial in range(10):
        torch.manual_seed(trial)
        x = torch.randn(64, 16)
        weight = torch.randn(8, 16, requires_grad=True)
        bias = torch.zeros(8, requires_grad=True) if with_bias else None
        y = wtacompile.sampled_linear(x, weight, bias, keep_ratio=0.1, min_rows=1)
        grad = torch.ones_like(y)
        grad[(7 * trial) % 64, trial % 8] = bad
        y.backward(grad)
        assert not torch.isfinite(weight.grad).all(), trial


def test_non_finite_grad_reaches_weight_grad_compiled():
    class BiasFree(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(16, 64, bias=False)
            self.down = nn.Linear(64, 4, bias=False)

        def forward(self, x):
            return self.down(F.relu(self.up(x)))

    model = BiasFree()
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.1, min_rows=1))
    for trial in range(5):
        model.zero_grad()
        y = compiled(torch.randn(128, 16))
        grad = torch.ones_like(y)
        grad[(13 * trial) % 128, 0] = math.inf
        y.backward(grad)
        assert not torch.isfinite(model.down.weight.grad).all()
        assert not torch.isfinite(model.up.weight.grad).all()


@pytest.mark.parametrize("dtype, big", [(torch.float16, 6e4), (torch.bfloat16, 1e38),
                                        (torch.float32, 1e38)])
def test_large_finite_grads_do_not_trip_the_check(dtype, big):
    """Huge but finite dY (whose sum would overflow any dtype) leaves dW finite."""
    x = torch.randn(512, 16, dtype=dtype) * 1e-4
    weight = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    y = wtacompile.sampled_linear(x, weight, None, keep_ratio=0.3)
    y.backward(torch.full_like(y, big))
    assert torch.isfinite(weight.grad).all()
