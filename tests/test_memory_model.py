"""The memory model from hand-written numbers: no model, no tracing."""

import pytest
import torch

from wtacompile.memory_model import (
    GraphMemory,
    MemoryModel,
    Reader,
    SampleableInput,
    Size,
    compact_bytes,
    format_bytes,
    parameter_bytes,
)


def test_size_is_exact_as_traced_and_affine_or_proportional_elsewhere():
    symbolic = Size(1000, 200)  # traced at batch 4: 200 bytes per sample plus 200 fixed
    assert symbolic.at(None, 4) == symbolic.at(4, 4) == 1000
    assert symbolic.at(10, 4) == 1000 + 6 * 200
    static = Size(1000)
    assert static.at(8, 4) == 2000 and static.at(2, 4) == 500
    assert (Size(5, 1) + Size(7, 2)) == Size(12, 3) and (Size(5, 1) - Size(7, 2)) == Size(-2, -1)
    with pytest.raises(ValueError, match="static and a symbolic"):
        Size(1) + Size(1, 1)


def test_compact_bytes_counts_kept_rows_and_int64_indices():
    # k = ceil(0.3 * 100) = 30 rows of 64 bf16 values, plus 30 int64 indices.
    assert compact_bytes(100, 64, 2, 0.3, 10) == 30 * 64 * 2 + 30 * 8
    # The floor on k: 0.05 * 100 = 5 < min_rows = 10.
    assert compact_bytes(100, 64, 2, 0.05, 10) == 10 * 64 * 2 + 10 * 8


def test_parameter_bytes_counts_shared_once_and_frozen_without_state():
    a = torch.nn.Parameter(torch.zeros(10, 10))  # 400 B
    b = torch.nn.Parameter(torch.zeros(30), requires_grad=False)  # 120 B
    assert parameter_bytes([a, b, a], "adamw") == (520, 400, 800, 800)
    assert parameter_bytes([a], "sgd") == (400, 400, 0, 0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        parameter_bytes([a], "lion")


def _model(**overrides):
    first = GraphMemory(Size(6000, 1000), (Size(500, 100), Size(3000, 500), Size(1200, 200)))
    second = GraphMemory(Size(4000, 800), (Size(2500, 400),))
    reader = Reader("layer.weight", rows=64, in_features=16, out_features=8, itemsize=4)
    fields = dict(parameters=1000, gradients=800, optimizer=1600, step_temporaries=200,
                  graphs=(first, second), inputs=(SampleableInput("0:x", Size(64 * 16 * 4, 16 * 16 * 4),
                                                                  (reader,)),),
                  trace_batch=4, min_rows=2)
    return MemoryModel(**(fields | overrides))


def test_transient_composes_graphs_in_reverse():
    model = _model()
    # Backward of the second graph runs while the first still holds 6000 B:
    # worst = max(0 + 3000, 6000 + 2500) = 8500; transient = 8500 - (6000 + 4000) < 0 -> 0.
    assert model.activations(4) == 10000 and model.transient(4) == 0
    # At batch 12: first holds 14000, its peak 7000; second 10400, peak 5700.
    assert model.activations(12) == 24400 and model.transient(12) == 0
    lone = _model(graphs=(GraphMemory(Size(100, 10), (Size(350, 5),)),))
    assert lone.transient(4) == 250 and lone.transient(8) == 350 + 20 - 140


def test_peak_and_planned_activations_with_a_sampled_input():
    model = _model()
    dense_input = 64 * 16 * 4
    kept = compact_bytes(64, 16, 4, 0.5, 2)
    assert model.planned_activations(4, {"0:x": 0.5}) == 10000 - dense_input + kept
    assert model.planned_activations(4, {"0:x": 1.0}) == 10000
    # Train peak (resident 2600 + activations + transient) vs step peak (2600 + 800 + 200).
    assert model.peak(4) == 2600 + 10000
    assert model.peak(4, {"0:x": 0.5}) == 2600 + 10000 - dense_input + kept
    assert model.fixed_at(4) == 2600 + 10000 - dense_input
    frozen_activations = _model(graphs=(GraphMemory(Size(10, 0), ()),), inputs=())
    assert frozen_activations.peak(4) == frozen_activations.step_peak() == 2600 + 800 + 200


def test_choices_scale_rows_with_the_batch():
    model = _model()
    (choice,) = model.choices_at(8, (1.0, 0.5, 0.25))
    assert choice.name == "0:x" and choice.dense_bytes == 64 * 16 * 4 + 4 * 16 * 16 * 4
    assert choice.sampled_bytes == {0.5: compact_bytes(128, 16, 4, 0.5, 2),
                                    0.25: compact_bytes(128, 16, 4, 0.25, 2)}
    assert choice.cost_weight == 16 * 8


@pytest.mark.parametrize("nbytes, text", [
    (0, "0 bytes"), (999, "999 bytes"), (999_400, "999 kB"), (999_600, "1 MB"), (1_000_000, "1 MB"),
    (12_345_678, "12.3 MB"), (1.5e12, "1500 GB"),
])
def test_format_bytes_never_prints_exponents(nbytes, text):
    """Each unit up to 999 of it; what rounds to 1000 reads as 1 of the next (not '1e+03 kB')."""
    assert format_bytes(nbytes) == text
