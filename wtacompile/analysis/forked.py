"""Run an independent trace in a forked process beside this one, while this one traces another.

Why: an analysis at partitioner budget 1 makes up to three AOTAutograd traces of one dynamo graph
(dense at the traced batch, the same at one batch row more for the slopes, and the
all-candidates-sampled graph for the verdicts), each single-threaded Python that takes seconds
for a 7B-shaped block stack. Two of them need nothing from the first: on a machine with two or
more cores they can run at the same time. Threads cannot (the GIL); a forked child can, and it
inherits the captured graph, its fake tensors and shape environment as they are (nothing to
pickle on the way in). What it sends back is plain data: sizes by node name, verdict facts.

When it is used: inside :func:`traces_in_parallel` (``plan()`` turns it on), on Linux, with more
than one usable core, and while CUDA (or XPU) is not initialised in this process (a forked child
cannot use it; a plan of a meta model never initialises it). Otherwise the work runs in this
process when its result is asked for, as before. Warnings the child's work issues are issued
again in this process (its filters apply, by module too); log records go to the handlers the
child inherited (a stream handler writes them as here; an in-memory one, such as pytest's
``caplog``, keeps them in the child). A
child that fails, dies, or takes far longer than this process did meanwhile is not trusted: the
work is done again here (an error it raised is then raised here, with its real traceback), and a
failure nobody here reproduces is logged as a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import multiprocessing
import os
import pickle
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch

__all__ = ["Deferred", "beside", "traces_in_parallel"]

log = logging.getLogger("wtacompile")

T = TypeVar("T")

_PARALLEL: contextvars.ContextVar[bool] = contextvars.ContextVar("wtacompile_parallel_traces", default=False)
_IN_CHILD = False  # set in a forked child: it forks no further

#: The parent waits for a child's result ``max(MIN_WAIT_S, WAIT_FACTOR × t)`` seconds, ``t`` the time
#: it spent on its own work since the fork (a child's trace takes about as long as the parent's;
#: a deadlocked child must not hang a plan).
MIN_WAIT_S = 120.0
WAIT_FACTOR = 10.0


@contextlib.contextmanager
def traces_in_parallel(enabled: bool = True) -> Iterator[None]:
    """Within: :func:`beside` may run its work in a forked process (see the module docstring)."""
    token = _PARALLEL.set(enabled)
    try:
        yield
    finally:
        _PARALLEL.reset(token)


def _can_fork() -> bool:
    if not _PARALLEL.get() or _IN_CHILD or not sys.platform.startswith("linux"):
        return False
    if multiprocessing.current_process().daemon:  # a Pool worker may not start processes
        return False
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    xpu = getattr(torch, "xpu", None)
    return cores > 1 and not torch.cuda.is_initialized() and not (
        xpu is not None and hasattr(xpu, "is_initialized") and xpu.is_initialized())


class Deferred(Generic[T]):
    """The result of ``work``: from the forked child started with it, or computed here when asked."""

    def __init__(self, work: Callable[[], T], what: str, prepare: Callable[[], object] | None = None) -> None:
        self._work, self._what = work, what
        self._process = self._connection = None
        self._started = time.perf_counter()
        if _can_fork():
            _prepare(prepare, what)
            if _can_fork():  # prepare may have initialised CUDA
                try:
                    self._start()
                except Exception as error:  # noqa: BLE001 - no memory or process slots: trace here instead
                    log.warning("wtacompile: could not fork for %s (%s); tracing it in this process",
                                what, error)
                    self._process = self._connection = None

    def cancel(self) -> None:
        """Stop the child, if any (its result is no longer wanted: the analysis failed meanwhile)."""
        process, connection = getattr(self, "_process", None), getattr(self, "_connection", None)
        self._process = self._connection = None
        if process is not None:
            connection.close()
            if process.is_alive():
                process.kill()
            process.join(1.0)

    def __del__(self) -> None:
        self.cancel()

    @property
    def forked(self) -> bool:
        return self._process is not None

    def _start(self) -> None:
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_child, args=(self._work, send), daemon=True,
                                        name=f"wtacompile: {self._what}")
        self._process.start()
        send.close()
        self._connection = receive

    def result(self) -> T:
        """The work's value (or the exception it raises, raised here)."""
        if self._process is None:
            return self._work()
        process, connection = self._process, self._connection
        self._process = self._connection = None
        waited = max(MIN_WAIT_S, WAIT_FACTOR * (time.perf_counter() - self._started))
        outcome: tuple | None = None
        timed_out = False
        try:
            if connection.poll(waited):
                outcome = connection.recv()
            else:
                timed_out = True
        except Exception:  # noqa: BLE001 - died before it sent anything, or sent what cannot be read
            outcome = None
        finally:
            connection.close()
            if process.is_alive():
                process.kill()
            process.join()
        if outcome is not None and outcome[0] == "value":
            for relayed in outcome[2]:
                _reissue(*relayed)
            return outcome[1]
        why = (f"it raised {outcome[1]}" if outcome is not None
               else f"no result after {waited:.0f} s" if timed_out
               else f"it ended with exit code {process.exitcode} before sending a result")
        value = self._work()  # an error of the work itself is raised here, with its traceback
        log.warning("wtacompile: %s in a forked process failed (%s); traced in this process instead",
                    self._what, why)
        return value


def _prepare(prepare: Callable[[], object] | None, what: str) -> None:
    """Run ``prepare`` (a speed-up only: a failure is logged, and the work forks unprepared)."""
    if prepare is not None:
        try:
            prepare()
        except Exception as error:  # noqa: BLE001 - the child then does that setup itself
            log.debug("wtacompile: preparing to fork for %s failed (%s: %s)", what, type(error).__name__, error)


def beside(work: Callable[[], T], what: str, prepare: Callable[[], object] | None = None) -> Deferred[T]:
    """Start ``work`` (a trace that returns plain, picklable data) in a forked child where that
    is allowed (see the module docstring); ``.result()`` gives its value. ``prepare`` runs here
    first, only if the work is forked: one-time setup the child then inherits instead of
    repeating (:func:`wtacompile.analysis.partition_trace.warm_up_tracing`)."""
    return Deferred(work, what, prepare)


def _relayed(caught: warnings.WarningMessage) -> tuple:
    """A warning the child caught, as plain data for the parent to issue (its category if it can
    be sent, else ``UserWarning``)."""
    category = caught.category
    try:
        pickle.dumps(category)
    except Exception:  # noqa: BLE001 - a warning class defined in a local scope
        category = UserWarning
    return str(caught.message), category, caught.filename, caught.lineno


def _reissue(message: str, category: type[Warning], filename: str, lineno: int) -> None:
    """Issue a child's warning here as if raised at its place: under the module's name (filters
    by module apply) and into its registry (a "default" warning shows once per place)."""
    module = next((m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == filename), None)
    registry = None if module is None else vars(module).setdefault("__warningregistry__", {})
    warnings.warn_explicit(message, category, filename, lineno,
                           module=None if module is None else module.__name__, registry=registry)


def _child(work: Callable[[], object], send) -> None:
    global _IN_CHILD
    _IN_CHILD = True
    # As DataLoader workers do: an OpenMP pool the parent started is not usable after a fork.
    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the parent's filters decide when it re-issues them
        try:
            outcome = ("value", work(), [_relayed(w) for w in caught])
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which redoes the work
            outcome = ("error", f"{type(error).__name__}: {error}")
    try:
        send.send(outcome)
    except Exception as error:  # noqa: BLE001 - an unpicklable value: the parent redoes the work
        with contextlib.suppress(Exception):  # or the parent stopped listening: nothing to tell
            send.send(("error", f"its result could not be sent ({type(error).__name__}: {error})"))
    finally:
        send.close()
