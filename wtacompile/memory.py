"""Measuring what autograd keeps for backward, independently of any report of ours.

:class:`SavedTensorMeter` hooks every tensor that autograd saves (eager nodes, custom
``autograd.Function`` s and the compiled graphs AOTAutograd builds alike, all of which go through
``save_for_backward``) and counts the *distinct storages* behind them, minus the ones that belong
to parameters or buffers: the bytes held alive from forward to backward because of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["SavedTensorMeter", "measure_peak_bytes", "measure_training_step", "storage_key"]


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


class SavedTensorMeter(torch.autograd.graph.saved_tensors_hooks):
    """Context manager counting saved-activation bytes.

    Example::

        with SavedTensorMeter(model.parameters()) as meter:
            loss = model(x).sum()
        print(meter.activation_bytes)
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {storage_key(t) for t in exclude}
        self._storages: dict[tuple[str, int], int] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorMeter:
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        from wtacompile.grad_predictor import sampler_storages

        key = storage_key(t)
        # The sampler's per-weight states are persistent, like buffers: left out. Judged now, while
        # the tensor is alive: read later, a state allocated where a freed activation was would
        # hide that activation (its address is all the key holds).
        if key not in self._excluded and t.device.type != "meta" and key not in sampler_storages():
            self._storages[key] = t.untyped_storage().nbytes()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def activation_bytes(self) -> int:
        """Bytes of the distinct non-parameter storages saved for backward (the sampler's
        per-weight states, persistent like buffers, are left out too)."""
        return sum(self._storages.values())

    @property
    def num_storages(self) -> int:
        return len(self._storages)


def measure_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated above the starting point while ``fn()`` runs, on the CPU.

    Reads the allocator's own allocation/free records through the profiler
    (``profile_memory=True``), so it sees every tensor, including those of compiled graphs
    (a Python dispatch mode would not: dynamo runs uncompiled code under one). Memory that
    existed before the call (parameters, optimizer state) is not included: add it yourself.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure_training_step(model: torch.nn.Module, batch: dict, options: dict | None = None,
                          *, backend: str = "wtacrs") -> tuple[int, int]:
    """Compile ``model`` and measure one AdamW step: (saved-activation bytes, peak bytes).

    The step is run once to compile and create the optimizer state; the measured step follows.
    Peak counts everything alive at the worst moment: parameters, optimizer state, the batch
    and whatever the step allocates (:func:`measure_peak_bytes`). Resets dynamo first.
    """
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with SavedTensorMeter(model.parameters()) as meter:
        loss = compiled(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del loss
    resident = {storage_key(p): p.untyped_storage().nbytes() for p in model.parameters()}
    for state in optimizer.state.values():
        resident.update({storage_key(v): v.untyped_storage().nbytes()
                         for v in state.values() if isinstance(v, torch.Tensor)})
    resident.update({storage_key(v): v.untyped_storage().nbytes()
                     for v in batch.values() if isinstance(v, torch.Tensor)})
    return meter.activation_bytes, sum(resident.values()) + measure_peak_bytes(step)
