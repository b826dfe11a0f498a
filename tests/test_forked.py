"""Traces in forked processes (wtacompile.analysis.forked): the same plan, and every way a child
can fail is redone in the parent, loudly."""

from __future__ import annotations

import logging
import os
import time

import pytest

from hf_models import build
from wtacompile import plan
from wtacompile.analysis import forked
from wtacompile.analysis.forked import beside, traces_in_parallel

with traces_in_parallel():
    _FORKS = forked._can_fork()
needs_fork = pytest.mark.skipif(not _FORKS, reason="forks only on Linux with two or more usable cores")


def _child_pid() -> int:
    return os.getpid()


def test_nothing_forks_outside_a_plan():
    deferred = beside(_child_pid, "a test")
    assert not deferred.forked and deferred.result() == os.getpid()
    with traces_in_parallel(False):
        assert not beside(_child_pid, "a test").forked


@needs_fork
def test_the_value_comes_from_the_child():
    with traces_in_parallel():
        deferred = beside(_child_pid, "a test")
    assert deferred.forked
    assert deferred.result() != os.getpid()


def test_prepare_runs_here_only_before_a_fork():
    """``prepare`` is setup the child inherits: run in this process, and only when it forks."""
    prepared = []
    with traces_in_parallel(False):
        deferred = beside(_child_pid, "a test", lambda: prepared.append(os.getpid()))
    assert deferred.result() == os.getpid() and prepared == []
    if _FORKS:
        with traces_in_parallel():
            deferred = beside(lambda: (_child_pid(), len(prepared)), "a test",
                              lambda: prepared.append(os.getpid()))
        child, seen = deferred.result()
        assert prepared == [os.getpid()] and child != os.getpid() and seen == 1  # inherited


def test_tracing_warm_up_keeps_no_joint_graph():
    """The two-linear warm-up trace leaves nothing in the joint-graph cache it runs within."""
    from wtacompile.analysis.partition_trace import reusing_joint_graphs, warm_up_tracing

    warm_up_tracing.cache_clear()
    with reusing_joint_graphs() as joints:
        warm_up_tracing("aot_eager")
    assert joints == {}


@needs_fork
def test_a_child_that_dies_is_redone_here(caplog):
    def work():
        if forked._IN_CHILD:
            os._exit(3)
        return 42

    with traces_in_parallel():
        deferred = beside(work, "a dying trace")
    with caplog.at_level(logging.WARNING, "wtacompile"):
        assert deferred.result() == 42
    assert "a dying trace in a forked process failed" in caplog.text and "exit code 3" in caplog.text


@needs_fork
def test_a_child_that_hangs_is_stopped_and_redone_here(caplog, monkeypatch):
    monkeypatch.setattr(forked, "MIN_WAIT_S", 0.5)
    monkeypatch.setattr(forked, "WAIT_FACTOR", 0.0)

    def work():
        if forked._IN_CHILD:
            time.sleep(60)
        return "here"

    with traces_in_parallel():
        deferred = beside(work, "a stuck trace")
    process = deferred._process
    with caplog.at_level(logging.WARNING, "wtacompile"):
        assert deferred.result() == "here"
    assert "no result after" in caplog.text
    assert not process.is_alive()  # stopped, not waited for


@needs_fork
def test_an_error_is_raised_here_with_its_own_type():
    def work():
        raise KeyError("missing node")

    with traces_in_parallel():
        deferred = beside(work, "a failing trace")
    assert deferred.forked
    with pytest.raises(KeyError, match="missing node"):
        deferred.result()


@needs_fork
def test_a_value_that_cannot_be_sent_is_redone_here(caplog):
    with traces_in_parallel():
        deferred = beside(lambda: (lambda: None), "an unpicklable result")
    with caplog.at_level(logging.WARNING, "wtacompile"):
        assert callable(deferred.result())
    assert "could not be sent" in caplog.text


@needs_fork
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_parallel_traces_plan_the_same(family, monkeypatch):
    """The largest-batch search (dense, next-batch and sampled traces: two forked) gives the
    plan traced one trace after another, number for number."""
    started = []
    real_start = forked.Deferred._start

    def counting_start(self):
        started.append(self._what)
        real_start(self)

    monkeypatch.setattr(forked.Deferred, "_start", counting_start)
    model, _ = build(family, layers=3)
    parallel = plan(model, 0.05, seq_len=16, inner="aot_eager", reuse_traces=False)
    assert len(started) == 2, started  # the verdict trace and the trace one batch row larger
    serial = plan(model, 0.05, seq_len=16, inner="aot_eager", reuse_traces=False, parallel_traces=False)
    assert len(started) == 2
    assert parallel.keep_ratios
    assert parallel.to_json() == serial.to_json()


def test_parallel_traces_must_be_a_bool():
    model, _ = build("llama", layers=1)
    with pytest.raises(ValueError, match="parallel_traces must be True or False"):
        plan(model, 1.0, parallel_traces="yes")


@needs_fork
def test_warnings_in_the_child_are_issued_here():
    import warnings

    def work():
        warnings.warn("from the trace", RuntimeWarning)
        return 1

    with traces_in_parallel():
        deferred = beside(work, "a warning trace")
    assert deferred.forked
    with pytest.warns(RuntimeWarning, match="from the trace"):
        assert deferred.result() == 1


@needs_fork
def test_a_cancelled_child_is_stopped():
    def work():
        if forked._IN_CHILD:
            time.sleep(60)
        return 0

    with traces_in_parallel():
        deferred = beside(work, "an unwanted trace")
    process = deferred._process
    deferred.cancel()
    assert not process.is_alive() and not deferred.forked
