"""Inputs a Hugging Face model trains on, synthesised from its config (no data needed)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from wtacompile._compat import unwrap_compiled

__all__ = ["batch_one_only", "default_example_inputs"]


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


def batch_one_only(model: torch.nn.Module) -> str | None:
    """Why ``model`` can run batch 1 only, or ``None``.

    A Hugging Face sequence classifier on a decoder (Llama, GPT-2, ...) pools each row at its last
    token, found by ``config.pad_token_id``; unset, its forward refuses batches above 1
    ("Cannot handle batch sizes > 1 if no padding token is defined"). Recognised by that check
    in the class's ``forward``, so an encoder's classifier (BERT pools the first token) is not.
    """
    base = unwrap_compiled(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # PEFT
    config = getattr(base, "config", None)
    if hasattr(config, "get_text_config"):  # what transformers' own check reads (multimodal configs)
        config = config.get_text_config()
    if config is None or getattr(config, "pad_token_id", 0) is not None:
        return None
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return None
    if "no padding token" not in source:
        return None
    return f"{type(base).__name__} finds each row's last token by its config's pad_token_id, which is not set"
