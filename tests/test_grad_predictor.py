"""Gradient-aware row scores: the learned ‖dY‖ prediction, unbiasedness, rows without gradient,
and the state's life (compiled and eager)."""

import pytest
import torch
import torch.nn as nn

import wtacompile
from conftest import heavy_tailed_rows
from wtacompile import grad_predictor as gp
from wtacompile.ops import sampled_linear

AOT = {"inner": "aot_eager"}


def test_row_cells_position_padding_labels():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    labels = torch.tensor([[-100, 5, -100], [-100, -100, 7]])
    cells = gp.row_cells(6, 3, torch.device("cpu"), mask, labels)
    # 4·position + 2·padding + [this label and the next one ignored] (a causal LM's loss at t
    # reads labels[t+1]; the last position has no next label)
    assert cells.tolist() == [0, 4, 11, 1, 6, 10]
    assert cells.dtype == torch.int32
    far = gp.row_cells(2 * 700, 700, torch.device("cpu"))
    assert far.max().item() == 4 * (gp.NUM_POSITIONS - 1)  # late positions share the last cell


def test_observe_learns_each_cells_mean_relative_norm():
    state = gp.new_state()
    cells = torch.tensor([0, 0, 4, 8, 8], dtype=torch.int32)
    grad = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [0.0, 0.0], [0.0, 0.0]])  # norms 5,0,10,0,0
    state = gp.observe(state, cells, grad)
    mean_norm = 3.0
    means, known_zero = gp._cell_means(state)
    # One observation: the bias-corrected average is the observation itself.
    torch.testing.assert_close(means[[0, 4, 8]], torch.tensor([2.5, 10.0, 0.0]) / mean_norm)
    assert means[1].item() == 1.0  # unseen cells predict an average row
    assert means[8].item() == 0.0 and not known_zero.any()  # zero once is not yet known zero
    torch.testing.assert_close(gp._scale(state), torch.tensor(mean_norm))
    repeated = gp.observe(gp.observe(state, cells, grad), cells, grad)
    assert gp._cell_means(repeated)[1].nonzero().flatten().tolist() == [8]  # zero 3 times: known
    # A second observation: β-weighted, bias-corrected average of the two.
    state = gp.observe(state, cells, 2 * grad.flip(0))  # norms 0,0,20,0,10 -> mean 6
    second = torch.tensor([0.0, 20.0, 5.0]) / 6.0
    first = torch.tensor([2.5, 10.0, 0.0]) / mean_norm
    beta = gp.DECAY
    want = ((1 - beta) * beta * first + (1 - beta) * second) / (1 - beta**2)
    torch.testing.assert_close(gp._cell_means(state)[0][[0, 4, 8]], want)
    assert gp._cell_means(state)[0][8].item() > 0  # it got a gradient: not zero any more


@pytest.mark.parametrize("bad", ["inf", "nan", "zero", "no rows"])
def test_a_step_that_says_nothing_leaves_the_state_alone(bad):
    """fp16 overflow (GradScaler will skip the step), a LoRA B still at zero, an empty input."""
    cells = torch.tensor([0, 4, 8], dtype=torch.int32)
    state = gp.observe(gp.new_state(), cells, torch.tensor([[1.0], [2.0], [3.0]]))
    grad = {"inf": torch.tensor([[1.0], [float("inf")], [3.0]]),
            "nan": torch.tensor([[1.0], [float("nan")], [3.0]]),
            "zero": torch.zeros(3, 1), "no rows": torch.zeros(0, 1)}[bad]
    used = cells if bad != "no rows" else cells[:0]
    assert torch.equal(gp.observe(state, used, grad), state)


def test_row_weights_are_scale_free_floored_and_positive():
    predicted = torch.tensor([4.0, 1.0, 0.01, 0.0, 0.0, 7.0])
    known_zero = torch.tensor([False, False, False, False, True, True])
    mean = (4.0 + 1.0 + 0.01 + 0.0) / 4
    want = torch.tensor([4.0 / mean, 1.0 / mean, gp.FLOOR, gp.FLOOR, gp.KNOWN_ZERO_WEIGHT, gp.KNOWN_ZERO_WEIGHT])
    for scale in (1.0, 1e-30, 1e30):  # relative: no underflow however small the gradients
        torch.testing.assert_close(gp.row_weights(predicted * scale, known_zero), want)
    # Nothing tells the rows apart (all predicted 0, none known zero): ‖X_i‖ alone, O(1).
    assert torch.equal(gp.row_weights(torch.zeros(4), torch.zeros(4, dtype=torch.bool)), torch.ones(4))
    # A score stays positive for a small row norm.
    assert ((torch.full((6,), 1e-3) * gp.row_weights(predicted, known_zero)) > 0).all()


def test_shared_sample_adds_the_members_variances():
    cells = torch.tensor([0, 4], dtype=torch.int32)
    a, b = gp.new_state(), gp.new_state()
    a = gp.observe(a, cells, torch.tensor([[1.0], [3.0]]))  # relative 0.5, 1.5; scale 2
    b = gp.observe(b, cells, torch.tensor([[4.0], [0.0]]))  # relative 2, 0; scale 2
    # Scales relative to the largest (both 2 here: 1).
    want = torch.tensor([(0.5 ** 2 + 2.0 ** 2) ** 0.5, (1.5 ** 2) ** 0.5])
    predicted, known_zero = gp.predict([a, b], cells)
    torch.testing.assert_close(predicted, want)
    assert not known_zero.any()


def _z2(samples: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean z² of the sample mean against ``exact`` over entries that vary."""
    draws = samples.shape[0]
    std = samples.std(0)
    varies = std > 1e-6 * std.max()
    z = (samples.mean(0) - exact)[varies] / (std[varies] / draws**0.5)
    return (z**2).mean().item()


def test_unbiased_when_the_prediction_is_wrong():
    """A state that rates rows the wrong way round, and holds rows with a gradient at known zero,
    still gives an unbiased estimate (every row's probability stays above zero)."""
    torch.manual_seed(4)
    x = heavy_tailed_rows(96, 12, seed=3)
    grad_out = torch.randn(96, 10) * torch.linspace(3.0, 0.1, 96)[:, None]
    weight = torch.randn(10, 12)
    cells = torch.arange(0, 4 * 96, 4, dtype=torch.int32)  # one cell per row (positions 0..95)
    wrong = gp.new_state()
    for _ in range(gp.MIN_ZERO_OBSERVATIONS):  # the last 16 rows: learned known zero, but not
        wrong = gp.observe(wrong, cells, torch.linspace(0.05, 3.0, 96)[:, None] * (torch.arange(96) < 80)[:, None])
    assert gp.predict([wrong], cells)[1].sum() == 16
    exact = grad_out.t() @ x
    samples = []
    for _ in range(3000):
        w = weight.clone().requires_grad_()
        state = wrong.clone()  # the same wrong prediction every draw
        y = sampled_linear(x, w, keep_ratio=0.3, min_rows=1, grad_state=state, cells=cells)
        samples.append(torch.autograd.grad(y, w, grad_out)[0])
    assert 0.6 < _z2(torch.stack(samples), exact) < 1.6


class Masked(nn.Module):
    """Two linears and a loss that reads only the unmasked rows, weighted unevenly."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 24), nn.Linear(24, 8)

    def forward(self, x, attention_mask, row_weight):
        h = self.down(2.0 * self.up(x))  # nothing else keeps either input: both sampled
        return (h.sum(-1) * row_weight * attention_mask).sum()


def _masked_batch():
    torch.manual_seed(1)
    x = torch.exp(torch.randn(6, 20, 1)) * torch.randn(6, 20, 8)
    mask = torch.ones(6, 20, dtype=torch.long)
    mask[:, 12:] = 0
    mask[0, 5:] = 0
    row_weight = torch.rand(6, 20) * torch.linspace(2.0, 0.2, 20)
    return x, mask, row_weight


def test_compiled_gradient_aware_is_unbiased_and_learns():
    model = Masked()
    x, mask, row_weight = _masked_batch()
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.3))
    for _ in range(gp.MIN_ZERO_OBSERVATIONS):
        compiled(x, mask, row_weight).backward()
    assert {s.weight for s in wtacompile.last_compile_report().sampled_sites} == {"up.weight", "down.weight"}
    # It learned: the padded cells are known zero, a real row's cell is not.
    state = gp.sampler_state_dict(model)["down.weight"]
    means, known_zero = gp._cell_means(state)
    assert known_zero[4 * 15 + 2] and means[4 * 3].item() > 0 and not known_zero[4 * 3]
    assert state[-1].item() == gp.MIN_ZERO_OBSERVATIONS  # one observation per backward
    # Unbiased with what it learned (autograd.grad leaves the state as it is: every draw alike).
    exact = torch.autograd.grad(model(x, mask, row_weight), model.down.weight)[0]
    samples = [torch.autograd.grad(compiled(x, mask, row_weight), model.down.weight)[0]
               for _ in range(1500)]
    # Rows scaled by exp(N(0,1)) and every entry of dW from the same draws: mean z² spreads widely
    # when unbiased (0.37–2.51 over eight runs of 1500 or 12000 draws, host and device draw, not
    # growing with draws); a bias of 0.05 standard deviations would put it near 5 at 1500 draws.
    assert 0.2 < _z2(torch.stack(samples), exact) < 4.0
    assert gp.sampler_state_dict(model)["down.weight"][-1].item() == gp.MIN_ZERO_OBSERVATIONS


def test_padded_rows_are_not_drawn_so_enough_rows_make_the_estimate_exact():
    """Once the padded cells are known zero, k ≥ the rows with a gradient keeps all of those as
    winners: the estimate is exact — no draw is spent on a padded row."""
    model = Masked()
    x, mask, row_weight = _masked_batch()
    real_rows = int(mask.sum())  # 61 of 120
    keep = 0.55  # k = 66
    assert wtacompile.num_kept_rows(120, keep, 10) >= real_rows
    exact = torch.autograd.grad(model(x, mask, row_weight), (model.up.weight, model.down.weight))
    for options in ({"row_scores": "norm"}, {}):
        gp.reset_sampler_state(model)
        compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=keep, **options))
        for _ in range(gp.MIN_ZERO_OBSERVATIONS):  # learns the pattern
            compiled(x, mask, row_weight).backward()
        got = torch.autograd.grad(compiled(x, mask, row_weight), (model.up.weight, model.down.weight))
        close = all(torch.allclose(g, e, rtol=1e-4, atol=1e-5) for g, e in zip(got, exact))
        assert close == (options == {}), options  # norm-only wastes draws on padding: not exact


def test_classifier_reading_only_cls_gets_its_last_layer_exact():
    """A BERT classifier's loss reads [CLS] only: after attention in the last layer only B rows get
    a gradient. Norm-only sampling often misses them all (dW exactly 0); gradient-aware keeps them."""
    from hf_models import build

    model, _ = build("bert", layers=2)
    torch.manual_seed(0)
    batch = dict(input_ids=torch.randint(3, 128, (8, 16)), attention_mask=torch.ones(8, 16, dtype=torch.long),
                 labels=torch.randint(0, 3, (8,)))
    names = ["bert.encoder.layer.1.intermediate.dense.weight", "bert.encoder.layer.1.output.dense.weight"]
    weights = [dict(model.named_parameters())[n] for n in names]
    exact = torch.autograd.grad(model(**batch).loss, weights)
    assert all(e.abs().sum() > 0 for e in exact)
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.3))
    for _ in range(gp.MIN_ZERO_OBSERVATIONS):  # learns that rows past position 0 get nothing
        compiled(**batch).loss.backward()
    assert set(names) <= {s.weight for s in wtacompile.last_compile_report().sampled_sites}
    model.zero_grad()
    for _ in range(10):
        got = torch.autograd.grad(compiled(**batch).loss, weights)
        for g, e in zip(got, exact):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
    norm_only = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.3, row_scores="norm"))
    # Norm-only scores spend draws on rows with no gradient: the [CLS] rows are rarely all kept.
    got = torch.autograd.grad(norm_only(**batch).loss, weights)
    assert not torch.allclose(got[1], exact[1], rtol=1e-2)


def test_ignored_labels_are_learned_zero():
    """Token classification with ignored labels (-100): in the last layer those rows get no
    gradient, and their cells (position, label ignored) are learned as known zero."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    model = tf.BertForTokenClassification(cfg)
    labels = torch.randint(0, 3, (4, 16))
    labels[:, 14:] = -100  # e.g. a truncated tail; positions 0..13 all carry a label
    batch = dict(input_ids=torch.randint(3, 128, (4, 16)), attention_mask=torch.ones(4, 16, dtype=torch.long),
                 labels=labels)
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.5))
    for _ in range(gp.MIN_ZERO_OBSERVATIONS):
        compiled(**batch).loss.backward()
    state = gp.sampler_state_dict(model)["bert.encoder.layer.0.output.dense.weight"]
    means, known_zero = gp._cell_means(state)
    # The rows whose label (and next label) are ignored get no gradient in the last layer.
    ignored = [4 * t + 1 for t in (14, 15)]
    scored = [4 * t for t in range(1, 14, 2)]
    assert known_zero[ignored].all()
    assert (means[scored] > 0).all() and not known_zero[scored].any()


def test_state_dict_roundtrip_reset_and_errors():
    model = Masked()
    x, mask, row_weight = _masked_batch()
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.3))
    compiled(x, mask, row_weight).backward()
    saved = gp.sampler_state_dict(model)
    assert set(saved) == {"up.weight", "down.weight"} and saved["down.weight"][-1].item() == 1
    other = Masked()
    gp.load_sampler_state_dict(other, saved)
    torch.testing.assert_close(gp.sampler_state_dict(other)["down.weight"], saved["down.weight"])
    gp.reset_sampler_state(model)
    assert gp.sampler_state_dict(model)["down.weight"].abs().sum().item() == 0
    compiled(x, mask, row_weight).backward()  # the compiled graph sees the reset in place
    assert gp.sampler_state_dict(model)["down.weight"][-1].item() == 1
    with pytest.raises(KeyError, match="unknown parameter"):
        gp.load_sampler_state_dict(model, {"nope.weight": saved["up.weight"]})
    with pytest.raises(ValueError, match="shape"):
        gp.load_sampler_state_dict(model, {"up.weight": torch.zeros(3)})


def test_one_compile_many_steps_and_recompiles_share_the_state():
    calls = []
    from wtacompile.backend import wtacrs_backend

    def counting(gm, inputs):
        calls.append(gm)
        return wtacrs_backend(gm, inputs, options=dict(AOT, keep_ratio=0.3))

    model = Masked()
    x, mask, row_weight = _masked_batch()
    compiled = torch.compile(model, backend=counting, dynamic=False)
    for _ in range(4):
        compiled(x, mask, row_weight).backward()
    assert len(calls) == 1  # no graph break, no recompile per step
    state = gp.state_for(model.down.weight)
    compiled(x[:, :16], mask[:, :16], row_weight[:, :16]).backward()  # a new length: a recompile
    assert len(calls) == 2
    assert gp.state_for(model.down.weight) is state and state[-1].item() == 5


def test_a_graph_reused_for_another_instance_learns_into_that_instances_state():
    model_a, model_b = Masked(), Masked()
    x, mask, row_weight = _masked_batch()
    calls = []
    from wtacompile.backend import wtacrs_backend

    def counting(gm, inputs):
        calls.append(gm)
        return wtacrs_backend(gm, inputs, options=dict(AOT, keep_ratio=0.3))

    for model in (model_a, model_b):
        torch.compile(model, backend=counting)(x, mask, row_weight).backward()
    assert len(calls) == 1  # dynamo reused the first instance's graph for the second
    for model in (model_a, model_b):
        assert gp.sampler_state_dict(model)["down.weight"][-1].item() == 1


def test_eager_mode_learns_with_the_mask_passed_in():
    model = Masked()
    x, mask, row_weight = _masked_batch()
    for _ in range(gp.MIN_ZERO_OBSERVATIONS):
        with wtacompile.sample_linears(0.3, attention_mask=mask):
            model(x, mask, row_weight).backward()
    means, known_zero = gp._cell_means(gp.sampler_state_dict(model)["down.weight"])
    assert known_zero[4 * 15 + 2] and means[4 * 3].item() > 0
    with pytest.raises(ValueError, match="row_scores"):
        with wtacompile.sample_linears(0.3, row_scores="grad"):
            pass


def test_unknown_row_scores_option():
    with pytest.raises(ValueError, match="unknown row_scores 'dy'.*gradient, norm"):
        wtacompile.WTAConfig.from_options({"row_scores": "dy"})


def test_two_forwards_before_one_backward_and_retain_graph():
    """Siamese/contrastive training runs a weight twice before backward: both uses' rows teach the
    state, folded in once per backward (nothing autograd saved is written in place)."""
    model = Masked()
    x, mask, row_weight = _masked_batch()
    with wtacompile.sample_linears(0.3, attention_mask=mask):
        loss = model(x, mask, row_weight) + model(x.flip(0), mask.flip(0), row_weight)
    loss.backward(retain_graph=True)
    loss.backward()
    assert gp.sampler_state_dict(model)["down.weight"][-1].item() == 2
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.3))
    gp.reset_sampler_state(model)
    (compiled(x, mask, row_weight) + compiled(x.flip(0), mask.flip(0), row_weight)).backward()
    state = gp.sampler_state_dict(model)["down.weight"]
    assert state[-1].item() == 1
    # Both uses were seen: position 5 is padding in the first batch's sequence 0 and in the
    # flipped batch's last sequence, real in all the others.
    assert gp._cell_means(state)[0][4 * 5 + 2].item() == 0.0 and gp._cell_means(state)[0][4 * 5].item() > 0


class Twice(nn.Module):
    """One weight at two sites of one graph."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)

    def forward(self, x):
        return self.shared(2.0 * self.shared(x)).sum()


@pytest.mark.parametrize("inner", ["aot_eager", "eager"])
def test_a_weight_used_twice_in_a_graph_has_one_state(inner):
    model = Twice()
    compiled = torch.compile(model, backend="wtacrs", options={"inner": inner, "keep_ratio": 0.3})
    compiled(torch.randn(4, 16, 8)).backward()
    assert [s.weight for s in wtacompile.last_compile_report().sampled_sites] == ["shared.weight", "shared.weight#1"]
    state = gp.sampler_state_dict(model)["shared.weight"]
    assert state[-1].item() == 1  # one backward, both sites' rows folded into one state
    assert state[gp.NUM_CELLS].item() == 1  # cell 0 (position 0) seen once, not twice


def test_dynamic_shapes_learn_across_lengths():
    model = Masked()
    x, mask, row_weight = _masked_batch()
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.3), dynamic=True)
    for length in (20, 14, 17):
        compiled(x[:, :length].contiguous(), mask[:, :length].contiguous(),
                 row_weight[:, :length].contiguous()).backward()
    means, known_zero = gp._cell_means(gp.sampler_state_dict(model)["down.weight"])
    assert gp.sampler_state_dict(model)["down.weight"][-1].item() == 3
    assert known_zero[4 * 13 + 2] and means[4 * 3].item() > 0  # padded at every length


def test_rows_of_a_2d_input_are_one_cell_so_nothing_is_learned():
    model = Twice()
    compiled = torch.compile(model, backend="wtacrs", options=dict(AOT, keep_ratio=0.3))
    compiled(torch.randn(64, 8)).backward()
    assert wtacompile.last_compile_report().sampled_sites and gp.sampler_state_dict(model) == {}
