"""Reuse a plan's analysed graphs for the next plan of the same model, inputs and settings.

Why: tracing is nearly all of a plan's time (dynamo and two AOTAutograd traces: seconds for a
7B-shaped model at partitioner budget 1, a couple of minutes per budget below it, where the model
is traced whole), solving a few milliseconds. People plan the same model again and again: a sweep
over ``mem_gb`` (which cards would do), ``plan()`` with and without a fixed ``batch_size``'s
budget search, a benchmark trying several targets. None of those changes the graphs, only the
numbers solved over them.

What must match for a plan to reuse another's graphs (:func:`trace_key`):

* the model: the same object, and nothing about it that changes what dynamo traces — every
  module's class, its scalar attributes (``training``, a gradient-checkpointing flag, dropout
  rates, an attention implementation), its hooks and any forward patched onto the instance, the
  Hugging Face config, and every parameter and buffer (name, shape, dtype, device,
  ``requires_grad``: a frozen layer, a PEFT adapter added, a dtype cast all retrace);
* the inputs: shapes, dtypes, devices and, for real tensors, their values (model code may branch
  on them, as Hugging Face's causal-mask shortcut does);
* the analysis settings (the :class:`~wtacompile.WTAConfig` but its ``mem_gb``, which sets log
  levels only), the partitioner budget, the traced batch (symbolic or not), block composition and
  the device planned for;
* torch's state that shapes a trace: the dynamo, functorch and Inductor configs, autocast and the
  default dtype.

Anything outside these that changes the trace — a module-level function monkeypatched between two
plans, say — is not seen: ``plan(..., reuse_traces=False)`` traces afresh. Entries live as long as
the model (a weak reference), at most :data:`MAX_ENTRIES_PER_MODEL` each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from wtacompile.config import WTAConfig
from wtacompile.passes import CompileState

__all__ = ["MAX_ENTRIES_PER_MODEL", "cached_capture", "clear", "trace_key"]

#: Analysed graph sets kept per model (one per partitioner budget, batch mode and input shape).
MAX_ENTRIES_PER_MODEL = 16

_SCALARS = (bool, int, float, str, type(None))
_entries: weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict[str, list[CompileState]]] = (
    weakref.WeakKeyDictionary())


def cached_capture(model: torch.nn.Module, key: Callable[[], str],
                   capture: Callable[[], list[CompileState]]) -> tuple[list[CompileState], bool]:
    """``capture()``'s states, or those of an earlier call whose ``key()`` was the same for
    ``model``; and whether they were reused.

    The key is taken before the capture and again after it, and the states kept under both: the
    trace itself may set attributes on the model (``torch.compile`` marks a Hugging Face model
    ``_is_torch_compile``), and the next plan sees the model as this one left it.
    """
    entries = _entries.setdefault(model, OrderedDict())
    before = key()
    if before in entries:
        entries.move_to_end(before)
        return list(entries[before]), True
    states = capture()
    for k in dict.fromkeys((before, key())):
        entries[k] = list(states)
    while len(entries) > MAX_ENTRIES_PER_MODEL:
        entries.popitem(last=False)
    return states, False


def clear() -> None:
    """Forget every model's analysed graphs."""
    _entries.clear()


def trace_key(model: torch.nn.Module, inputs: Any, config: WTAConfig, symbolic_batch: int | None,
              compose_blocks: bool, device_type: str) -> str:
    """A digest of everything a plan's traced graphs depend on (see the module docstring)."""
    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        digest.update(repr(parts).encode())
        digest.update(b"\0")

    add("settings", dataclasses.replace(config, mem_gb=None), symbolic_batch, compose_blocks, device_type)
    add("torch", torch.__version__, torch.get_default_dtype(), _autocast_state(),
        *(_config_items(c) for c in (torch._dynamo.config, torch._functorch.config, torch._inductor.config)))
    _add_model(add, model)
    _add_value(add, digest, inputs)
    return digest.hexdigest()


def _autocast_state() -> tuple:
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


def _config_items(module: Any) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in module.get_config_copy().items()))


def _add_model(add: Callable[..., None], model: torch.nn.Module) -> None:
    seen_configs: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        scalars, configs = [], []
        for attr, value in vars(module).items():
            if isinstance(value, _SCALARS):
                scalars.append((attr, value))
            elif hasattr(value, "to_json_string") and id(value) not in seen_configs:  # a HF config
                seen_configs.add(id(value))
                configs.append((attr, value.to_json_string(use_diff=False),
                                getattr(value, "_attn_implementation", None)))
        hooks = tuple(len(getattr(module, h)) for h in ("_forward_hooks", "_forward_pre_hooks",
                                                         "_backward_hooks", "_backward_pre_hooks"))
        patched = vars(module).get("forward")
        add(name, type(module).__module__, type(module).__qualname__, tuple(sorted(scalars)), configs, hooks,
            None if patched is None else id(patched))
        for kind, store in (("p", module._parameters), ("b", module._buffers)):
            for tensor_name, tensor in store.items():
                add(kind, tensor_name, None if tensor is None else _tensor_meta(tensor))
    add("global hooks", len(torch.nn.modules.module._global_forward_hooks),
        len(torch.nn.modules.module._global_forward_pre_hooks))


def _tensor_meta(tensor: torch.Tensor) -> tuple:
    return (tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device.type, tensor.requires_grad)


def _add_value(add: Callable[..., None], digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        add("tensor", _tensor_meta(value))
        if value.device.type != "meta":
            # Values matter where model code branches on them (an all-ones attention mask).
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        add("mapping", len(value))
        for k in value:
            add("key", k)
            _add_value(add, digest, value[k])
    elif isinstance(value, (tuple, list)):
        add("sequence", type(value).__name__, len(value))
        for item in value:
            _add_value(add, digest, item)
    elif isinstance(value, _SCALARS):
        add("scalar", value)
    else:  # an object we cannot see into: only itself matches
        add("object", type(value).__qualname__, id(value))
