"""Measuring what autograd keeps for backward, independently of any report of ours.

:class:`SavedTensorMeter` hooks every tensor that autograd saves (eager nodes, custom
``autograd.Function`` s and the compiled graphs AOTAutograd builds alike, all of which go through
``save_for_backward``) and counts the *distinct storages* behind them, minus the ones that belong
to parameters or buffers: the bytes held alive from forward to backward because of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["SavedTensorMeter", "measure_peak_bytes", "storage_key"]


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
        key = storage_key(t)
        if key not in self._excluded and t.device.type != "meta":
            self._storages[key] = t.untyped_storage().nbytes()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def activation_bytes(self) -> int:
        """Bytes of the distinct non-parameter storages saved for backward."""
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
