"""Capture a model's training graphs for planning, on fake parameters, and analyse each.

Dynamo runs the model with every parameter and buffer swapped for a fake twin (same shape, dtype,
requires_grad), so tracing allocates nothing and a model built on the meta device plans as well
as a real one (:func:`capture_graphs`). Each training graph goes through the backend's own
analysis passes (:data:`wtacompile.passes.ANALYSIS_PASSES`); the result is their
:class:`CompileState` s (:func:`analyse_graphs`). Captured once, the graphs can be analysed at
several partitioner budgets, each reusing the joint graphs the first analysis traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch

from wtacompile._compat import (compile_isolated, fake_twin, parameter_aliases, parameter_names,
                                without_dynamo_debug_text)
from wtacompile.analysis.partition_trace import JointGraphs, copy_module, reusing_joint_graphs
from wtacompile.config import WTAConfig
from wtacompile.passes import ANALYSIS_PASSES, CompileState, run_passes

__all__ = ["CapturedGraphs", "analyse_graphs", "capture_analyses", "capture_graphs"]


@dataclasses.dataclass
class CapturedGraphs:
    """A model's training graphs as dynamo captured them (on fake parameters), in forward order,
    and the joint graphs their analyses have traced so far (reused by later analyses)."""

    graphs: list[tuple[torch.fx.GraphModule, tuple[Any, ...], Mapping[int, str]]]
    # The fake parameters and the inputs the model ran on: the graphs know them by weak
    # reference only.
    kept_alive: tuple[Any, ...]
    joints: JointGraphs = dataclasses.field(default_factory=dict)
    # A tied parameter's other names (wtacompile._compat.parameter_aliases)
    aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def capture_analyses(model: torch.nn.Module, example_inputs, config: WTAConfig,
                     symbolic_batch: int | None) -> list[CompileState]:
    """Analysed training graphs of ``model`` on ``example_inputs``, in forward order.

    ``symbolic_batch``: the batch size to mark dynamic (one capture then serves every batch size;
    at partitioner budget 1 the analysis traces it statically at that batch and one larger, for
    about 1.7 times the tracing time of a fixed batch), or ``None`` for a static trace.
    """
    return analyse_graphs(capture_graphs(model, example_inputs, symbolic_batch), config, keep_joints=False)


def analyse_graphs(captured: CapturedGraphs, config: WTAConfig, keep_joints: bool = True) -> list[CompileState]:
    """The analysis passes under ``config`` on each captured graph (none of them changes it);
    ``keep_joints``: keep the joint graphs they trace in ``captured`` for later analyses."""
    reuse = reusing_joint_graphs(captured.joints) if keep_joints else contextlib.nullcontext()
    with torch.enable_grad(), reuse:
        return [run_passes(gm, CompileState(config, inputs, parameter_names=names,
                                            parameter_aliases=MappingProxyType(captured.aliases)), ANALYSIS_PASSES)
                for gm, inputs, names in captured.graphs]


def capture_graphs(model: torch.nn.Module, example_inputs, symbolic_batch: int | None) -> CapturedGraphs:
    """``model``'s training graphs on ``example_inputs`` (see :func:`capture_analyses`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    graphs: list[tuple[torch.fx.GraphModule, tuple[Any, ...], Mapping[int, str]]] = []

    def capture_backend(gm, inputs):
        if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in inputs):
            names = MappingProxyType(parameter_names(model))  # the fake twins swapped in now
            # A copy: dynamo strips its own graph's placeholders of what they lifted once the
            # backend returns, and the analyses read it (which parameter each one is).
            graphs.append((copy_module(gm), tuple(inputs), names))
        return gm.forward

    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)

    def realised(value):
        # Inputs stay real (token ids are small): code that inspects them, such as Hugging
        # Face's causal-mask shortcut, must take the path it takes in training.
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return torch.zeros(value.shape, dtype=value.dtype)
        return value

    if isinstance(example_inputs, Mapping):
        args, kwargs = (), {k: realised(v) for k, v in example_inputs.items()}
    else:
        args, kwargs = tuple(realised(v) for v in example_inputs), {}
    if symbolic_batch is not None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == symbolic_batch:
                torch._dynamo.maybe_mark_dynamic(value, 0)
    # Planning compiles with a backend of its own in an isolated cache region: the user's
    # compiled functions keep their entries (another backend's entries never match ours, and ours
    # never count against their recompile limit), so nothing of theirs recompiles afterwards.
    with _fake_parameters(model, fake_mode) as twins, torch.enable_grad(), fake_mode, without_dynamo_debug_text():
        compile_isolated(model, capture_backend)(*args, **kwargs)
    if not graphs:
        raise ValueError("plan(): the model produced no training graph (nothing requires grad?)")
    return CapturedGraphs(graphs, (twins, args, kwargs), aliases=parameter_aliases(model))


def _twin_device(t: torch.Tensor) -> torch.device:
    # Meta tensors trace badly through autograd (e.g. nll_loss loses its derivative on the meta
    # device), so meta-built models are planned as if on the CPU: fake tensors allocate nothing.
    return torch.device("cpu") if t.device.type == "meta" else t.device


@contextlib.contextmanager
def _fake_parameters(model: torch.nn.Module, fake_mode) -> Iterator[tuple[torch.Tensor, ...]]:
    """Swap every parameter and buffer for a fake twin for the duration; put the originals back.
    Yields the twins."""
    swapped, twins = [], []
    twin_of: dict[int, torch.Tensor] = {}  # one twin per tensor: a tied weight stays tied
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None:
                    swapped.append((store, name, tensor))
                    if id(tensor) not in twin_of:
                        twin_of[id(tensor)] = fake_twin(tensor, fake_mode, _twin_device(tensor))
                        twins.append(twin_of[id(tensor)])
                    store[name] = twin_of[id(tensor)]
    try:
        yield tuple(twins)
    finally:
        for store, name, tensor in swapped:
            store[name] = tensor
