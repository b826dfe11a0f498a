"""Inputs a Hugging Face model trains on, synthesised from its config (no data needed)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["default_example_inputs"]


def default_example_inputs(model: torch.nn.Module, batch_size: int, seq_len: int | None,
                           device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
    """Token ids (and labels for the loss), or images for vision models, from ``model.config``."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no .config: pass example_inputs=... to plan()")
    params = inspect.signature(model.forward).parameters
    inputs: dict[str, Any] = {}
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        inputs["pixel_values"] = torch.zeros(batch_size, channels, size, size, device=device)
        if "labels" in params:
            inputs["labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return inputs
    if seq_len is None:
        raise ValueError("seq_len is needed to plan a text model (or pass example_inputs=...)")
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    inputs["input_ids"] = ids
    if "labels" in params:
        name = type(model).__name__
        if "SequenceClassification" in name:
            inputs["labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        else:
            inputs["labels"] = ids
    # Training: no KV cache. A wrapper that takes **kwargs (a PEFT model) passes it on to the
    # model it wraps; left out there, that model builds a cache of every layer (the trace then
    # grows with the depth, and returns the keys and values).
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "use_cache" in params or (takes_kwargs and getattr(config, "use_cache", None) is not None):
        inputs["use_cache"] = False
    return inputs
