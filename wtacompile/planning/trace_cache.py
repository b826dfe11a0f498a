"""Reuse a plan's analysed graphs for the next plan of the same model, inputs and settings.

Why: tracing is nearly all of a plan's time (dynamo and two AOTAutograd traces: seconds for a
7B-shaped model at partitioner budget 1, a couple of minutes below it, where the model is traced
whole), solving a few milliseconds. People plan the same model again and again: a sweep over
``mem_gb`` (which cards would do), a benchmark trying several targets. None of those changes the
graphs, only the numbers solved over them. A plan reuses the analysed graphs an earlier one made
at the same partitioner budget. Where the model is traced whole (below budget 1, or with
``compose_blocks=False``), a budget no earlier plan tried reuses the whole model's captured
graphs (dynamo's, and the joint graphs their analyses traced: ``purpose``) and only splits and
analyses them again; the three blocks traced at budget 1 are kept as analysed graphs only.

What must match for a plan to reuse another's graphs (:func:`trace_key`):

* the model: the same object, and nothing about it that changes what dynamo traces — every
  module's class and attributes (``training``, a gradient-checkpointing flag and function,
  dropout rates, PEFT's active and merged adapters: scalars, containers, dtypes and dataclasses by
  value, functions and other objects by identity), its hooks (by handle), the Hugging Face config
  (every field, the attention implementation included), and every parameter and buffer (name,
  shape, stride, dtype, device, ``requires_grad``: a frozen layer, a PEFT adapter added, a dtype
  cast all retrace);
* the inputs: shapes, dtypes, devices, dynamo's dynamic marks and, for real tensors, their values
  (model code may branch on them, as Hugging Face's causal-mask shortcut does); an object it
  cannot see into, by identity;
* the analysis settings (the :class:`~wtacompile.WTAConfig` but ``mem_gb``, which sets log levels
  only, and ``optimizer``, which sizes state the traces never see), the partitioner budget, the
  traced batch (symbolic or not), block composition and the device planned for;
* torch's state that shapes a trace: the dynamo, functorch, Inductor and fx configs (custom
  passes by their ``uuid()``), the attention kernels allowed (``sdpa_kernel``), autocast, and the
  default dtype and device.

Objects told apart by identity must be the very ones, alive (weak references): an address reused
by a new object never matches. Where something cannot be described at all (a sparse input, an
object that takes no weak reference) the plan traces afresh and keeps nothing. Anything outside
these that changes the trace — a module-level function monkeypatched between two plans, say — is
not seen: ``plan(..., reuse_traces=False)`` traces afresh. Entries live as long as the model (a
weak reference), at most :data:`MAX_ENTRIES_PER_MODEL` each.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import logging
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from wtacompile.config import WTAConfig

__all__ = ["MAX_ENTRIES_PER_MODEL", "TraceKey", "cached_capture", "clear", "trace_key"]

log = logging.getLogger("wtacompile")

#: Entries kept per model: analysed graph sets (one per partitioner budget, batch mode and input
#: shape) and captured ones (one per batch mode and input shape: the whole model's dynamo and
#: joint graphs, the largest entries; ``clear()`` lets them go before the model does).
MAX_ENTRIES_PER_MODEL = 16

_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_MODULE_STORES = frozenset({"_parameters", "_buffers", "_modules"})
_MAX_ITEMS = 256  # a longer container in a module's attributes is told apart by identity
_MAX_DEPTH = 6


@dataclass(frozen=True)
class TraceKey:
    """A digest of what the traces depend on, and the objects told apart only by identity (a
    patched forward, a hook, an opaque input): a reuse needs those very objects, alive."""

    digest: str
    identities: tuple[Any, ...]


T = TypeVar("T")


@dataclass
class _Entry:
    states: list[Any]  # analysed graphs (CompileState) or captured ones
    identities: tuple[weakref.ref, ...]

    def matches(self, key: TraceKey) -> bool:
        return len(self.identities) == len(key.identities) and all(
            ref() is obj for ref, obj in zip(self.identities, key.identities))


_entries: weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict[str, _Entry]] = weakref.WeakKeyDictionary()


class _Uncacheable(Exception):
    """Something the key cannot describe safely: trace afresh, keep nothing."""


def cached_capture(model: torch.nn.Module, key: Callable[[], TraceKey | None],
                   capture: Callable[[], list[T]]) -> tuple[list[T], bool]:
    """``capture()``'s states (analysed graphs, or captured ones), or those of an earlier call
    whose ``key()`` was the same for ``model``; and whether they were reused. A ``None`` key (nothing safe to key on) captures
    afresh and keeps nothing.

    The key is taken before the capture and again after it, and the states kept under both: the
    trace itself may set attributes on the model (``torch.compile`` marks a Hugging Face model
    ``_is_torch_compile``), and the next plan sees the model as this one left it.
    """
    entries = _entries.setdefault(model, OrderedDict())
    before = key()
    if before is not None:
        found = entries.get(before.digest)
        if found is not None and found.matches(before):
            entries.move_to_end(before.digest)
            return list(found.states), True
    states = capture()
    after = key() if before is not None else None
    for k in (before, after):
        if k is not None:
            try:
                entries[k.digest] = _Entry(list(states), tuple(weakref.ref(o) for o in k.identities))
            except TypeError:  # an identity that takes no weak reference: keep nothing
                entries.pop(k.digest, None)
    while len(entries) > MAX_ENTRIES_PER_MODEL:
        entries.popitem(last=False)
    return states, False


def clear() -> None:
    """Forget every model's analysed graphs."""
    _entries.clear()


def trace_key(model: torch.nn.Module, inputs: Any, config: WTAConfig, symbolic_batch: int | None,
              compose_blocks: bool, device_type: str, purpose: str = "analysed graphs") -> TraceKey | None:
    """What a plan's traced graphs depend on (see the module docstring); ``None`` where some
    part cannot be described safely (the plan then traces afresh). ``purpose`` tells apart what
    is kept: the analysed graphs, or dynamo's captured graphs that analyses at several
    partitioner budgets share."""
    digest = hashlib.sha256()
    identities: list[Any] = []
    try:
        describe = _Describer(identities)
        # The optimizer sizes state, which the memory model adds; the traces never read it.
        settings = dataclasses.replace(config, mem_gb=None, optimizer="adamw")
        parts = [
            ("settings", purpose, repr(settings), symbolic_batch, compose_blocks, device_type),
            ("torch", torch.__version__, repr(torch.get_default_dtype()), repr(torch.get_default_device()),
             _autocast_state(), _attention_backends()),
            *(("config", name, describe.config_module(c)) for name, c in _config_modules()),
            ("model", describe.model(model)),
            ("inputs", describe.inputs(inputs, digest)),
        ]
        digest.update(repr(parts).encode())
    except _Uncacheable as why:
        log.debug("wtacompile.plan: traces not kept for reuse (%s)", why)
        return None
    return TraceKey(digest.hexdigest(), tuple(identities))


def _autocast_state() -> tuple:
    state = []
    for device in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia"):
        try:
            if torch.amp.is_autocast_available(device):
                state.append((device, torch.is_autocast_enabled(device), repr(torch.get_autocast_dtype(device))))
        except (RuntimeError, ValueError):
            continue
    return tuple(state)


def _attention_backends() -> tuple:
    """Which scaled-dot-product attention kernels may run (``sdpa_kernel`` sets them; the math
    one saves the probabilities, the fused ones do not)."""
    cuda = torch.backends.cuda
    return (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
            cuda.cudnn_sdp_enabled())


def _config_modules() -> list[tuple[str, Any]]:
    import torch._inductor.config
    import torch.fx.experimental._config

    return [("dynamo", torch._dynamo.config), ("functorch", torch._functorch.config),
            ("inductor", torch._inductor.config), ("fx", torch.fx.experimental._config)]


class _Describer:
    """Plain, comparable descriptions of what a trace may depend on; objects it cannot see into
    go to ``identities``."""

    def __init__(self, identities: list[Any]) -> None:
        self.identities = identities
        self._seen: dict[int, int] = {}  # id -> index of an object already described (a shared config)

    def identity(self, value: Any) -> tuple:
        # The address tells live objects apart in the digest; the weak reference checked on a
        # reuse tells a new object at a freed one's address apart.
        self.identities.append(value)
        return ("identity", type(value).__qualname__, id(value))

    def config_module(self, module: Any) -> tuple:
        # The live values, not get_config_copy(): a deep copy gives a pass object a new address.
        names = sorted(getattr(module, "_config", None) or module.get_config_copy())
        with warnings.catch_warnings():  # deprecated entries warn when read
            warnings.simplefilter("ignore", FutureWarning)
            return tuple((name, self.value(getattr(module, name))) for name in names)

    def model(self, model: torch.nn.Module) -> tuple:
        described = []
        for name, module in model.named_modules(remove_duplicate=False):
            attributes = []
            for attr, value in vars(module).items():
                if attr in _MODULE_STORES:
                    continue
                if "hooks" in attr and isinstance(value, Mapping):  # handle ids only ever grow
                    attributes.append((attr, tuple(value.keys())))
                else:
                    attributes.append((attr, self.value(value)))
            tensors = tuple((kind, tensor_name, None if t is None else _tensor_meta(t))
                            for kind, store in (("p", module._parameters), ("b", module._buffers))
                            for tensor_name, t in store.items())
            described.append((name, type(module).__module__, type(module).__qualname__,
                              tuple(sorted(attributes, key=lambda a: a[0])), tensors))
        hooks = torch.nn.modules.module
        described.append(tuple((h, tuple(getattr(hooks, h).keys())) for h in sorted(vars(hooks))
                               if h.startswith("_global_") and "hooks" in h and isinstance(getattr(hooks, h), Mapping)))
        return tuple(described)

    def inputs(self, value: Any, digest, depth: int = 0) -> Any:
        """Like :meth:`value`, and a real tensor's values go into ``digest`` (model code may
        branch on them: an all-ones attention mask)."""
        if isinstance(value, torch.Tensor):
            if value.device.type != "meta":
                try:
                    digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                except Exception as error:  # noqa: BLE001 - sparse, nested, fake: not keyable
                    raise _Uncacheable(f"an input tensor's values cannot be read ({error})") from error
            return ("tensor", _tensor_meta(value))
        if isinstance(value, Mapping):
            return ("mapping", tuple((self.value(k), self.inputs(v, digest, depth + 1)) for k, v in value.items()))
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(self.inputs(v, digest, depth + 1) for v in value))
        return self.value(value, depth)

    def value(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, _SCALARS):
            return value
        if isinstance(value, (torch.dtype, torch.device, torch.Size, enum.Enum, type)):
            return ("repr", repr(value))
        if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)) and \
                isinstance(getattr(value, "__self__", None), (types.ModuleType, type(None))):
            return ("builtin", getattr(value, "__module__", None), value.__qualname__)  # torch's gelu
        if isinstance(value, torch.Tensor):  # not a parameter or buffer: told apart as itself
            return ("tensor", _tensor_meta(value), None if value.device.type == "meta" else self.identity(value))
        if isinstance(value, torch.nn.Module):
            return ("module", type(value).__qualname__)  # its own entry describes it
        if depth >= _MAX_DEPTH:
            return self.identity(value)
        seen = self._seen.get(id(value))
        if seen is not None:
            return ("seen", seen)
        if isinstance(value, (list, tuple, set, frozenset, Mapping)) and len(value) > _MAX_ITEMS:
            return self.identity(value)
        if isinstance(value, Mapping):
            return ("mapping", tuple((self.value(k, depth + 1), self.value(v, depth + 1)) for k, v in value.items()))
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(self.value(v, depth + 1) for v in value))
        if isinstance(value, (set, frozenset)):
            return ("set", tuple(sorted(repr(self.value(v, depth + 1)) for v in value)))
        if isinstance(value, functools.partial):
            return ("partial", self.value(value.func, depth + 1), self.value(value.args, depth + 1),
                    self.value(value.keywords, depth + 1))
        uuid = getattr(value, "uuid", None)
        if callable(uuid) and hasattr(value, "__call__"):  # a custom graph pass says what it is
            try:
                return ("pass", type(value).__qualname__, repr(uuid()))
            except Exception:  # noqa: BLE001 - not a pass after all
                pass
        if dataclasses.is_dataclass(value):  # a PEFT config, say
            return ("dataclass", type(value).__qualname__, self.value(vars(value), depth + 1))
        if _is_hf_config(value):
            self._seen[id(value)] = len(self._seen)
            return ("hf config", type(value).__qualname__, self.value(vars(value), depth + 1))
        return self.identity(value)  # a function, a bound method, an object we cannot see into


def _is_hf_config(value: Any) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return False
    return isinstance(value, PretrainedConfig)


def _tensor_meta(tensor: torch.Tensor) -> tuple:
    try:
        layout = (tuple(tensor.shape), tuple(tensor.stride()))
    except (RuntimeError, NotImplementedError) as error:  # sparse, nested
        raise _Uncacheable(f"a tensor without strides ({error})") from error
    marks = tuple((m, repr(getattr(tensor, m, None))) for m in
                  ("_dynamo_dynamic_indices", "_dynamo_unbacked_indices", "_dynamo_weak_dynamic_indices",
                   "_dynamo_static_indices"))
    return (*layout, repr(tensor.dtype), tensor.device.type, tensor.requires_grad, tensor.layout, marks)
