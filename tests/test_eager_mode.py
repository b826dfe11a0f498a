"""sample_linears(): eager sampling on an unmodified Hugging Face model."""

import pytest
import torch

from hf_models import build
from wtacompile import SavedTensorMeter, sample_linears


def test_routes_trainable_linears_and_saves_less():
    model, batch = build("bert")
    params = list(model.parameters())
    with SavedTensorMeter(params) as dense:
        dense_loss = model(**batch).loss
    with SavedTensorMeter(params) as sampled, sample_linears(keep_ratio=0.3):
        loss = model(**batch).loss
    assert torch.equal(loss, dense_loss)  # forward is exact
    assert sampled.activation_bytes < dense.activation_bytes
    loss.backward()  # backward outside the block: choices were saved in forward
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)


def test_frozen_weights_and_no_grad_stay_dense():
    model, batch = build("bert")
    for p in model.parameters():
        p.requires_grad_(False)
    with sample_linears(), torch.no_grad():
        model(**batch)
    with SavedTensorMeter(list(model.parameters())) as meter, sample_linears():
        model(**batch)
    assert meter.activation_bytes == 0


def test_include_exclude_need_model():
    with pytest.raises(ValueError, match="model="):
        with sample_linears(include=["*.query.*"]):
            pass


def test_exclude_pattern_keeps_those_dense():
    model, batch = build("bert")
    params = list(model.parameters())
    with SavedTensorMeter(params) as all_sampled, sample_linears(model=model):
        model(**batch)
    with SavedTensorMeter(params) as some, sample_linears(model=model, exclude=["*.intermediate.*"]):
        model(**batch)
    assert all_sampled.activation_bytes < some.activation_bytes
