"""``plan()``: capture and analyse the model, build the memory model, solve, and report.

The memory model is :mod:`wtacompile.memory_model` (documented there), fed by the backend's own
analysis of each captured graph; the ratios come from :func:`wtacompile.solver.solve`. Sizes are
exact at the traced batch. When searching for the largest batch dynamo captures the graphs once
with a symbolic batch dimension, and each size becomes a line in the batch (at partitioner budget
1 from static traces at the traced batch and one more, 2 and 3 for the inputs ``plan()`` makes;
below it from a symbolic trace); for a fixed ``batch_size`` the max-batch figures assume
proportional scaling from it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from wtacompile.analysis.forked import traces_in_parallel
from wtacompile.config import WTAConfig, check_activation_memory_budget, check_mem_gb
from wtacompile.estimator import DEFAULT_MIN_ROWS, num_kept_rows
from wtacompile.lower import target_device
from wtacompile.memory_model import MemoryModel, format_bytes, parameter_bytes
from wtacompile.passes import CompileState
from wtacompile.sites import FREES, sampled_linear
from wtacompile.solver import DEFAULT_BUDGET_MENU, DEFAULT_MENU, Solution, fastest_fitting, solve
from wtacompile.time_model import GraphCost, balance_for, step_time_ratio
from .blocks import compose_states, find_repeated_blocks, one_block_per_run
from .capture import CapturedGraphs, analyse_graphs, capture_analyses, capture_graphs
from . import trace_cache
from .inputs import batch_one_only, default_example_inputs
from wtacompile.plan_result import LayerPlan, Plan

__all__ = ["plan"]


def plan(
    model: torch.nn.Module,
    mem_gb: float,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    example_inputs: Mapping[str, Any] | tuple | None = None,
    optimizer: str = "adamw",
    menu: tuple[float, ...] = DEFAULT_MENU,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    min_rows: int = DEFAULT_MIN_ROWS,
    inner: str = "inductor",
    max_batch: int = 1 << 16,
    world_size: int = 1,
    compose_blocks: bool = True,
    activation_budgets: tuple[float, ...] = DEFAULT_BUDGET_MENU,
    device_type: str | None = None,
    reuse_traces: bool = True,
    parallel_traces: bool = True,
) -> Plan:
    """Plan keep ratios and the partitioner budget so predicted peak memory fits ``mem_gb`` at the
    least step time, then the least gradient variance.

    The partitioner budgets ``activation_budgets`` (torch's ``activation_memory_budget``; lower
    recomputes more in backward) are searched for the largest at which the solver can fit the
    budget, the graphs analysed at each tried: the least recompute that fits (recompute is what
    costs time, sampling saves some), and at that budget the least-variance ratios. The largest
    is tried first (most budgets need no recompute), then the others from the top
    (:func:`wtacompile.solver.first_fitting`: a predicted peak is not monotone in the budget).
    Where the largest that fits stays dense (its sampled partition would save more than its
    dense one), the next lower budget that fits is tried too, and taken if it samples and is
    predicted faster (:func:`wtacompile.solver.fastest_fitting`). A budget dense training
    fits is planned exact at partitioner budget 1; ``activation_budgets=(1.0,)`` plans sampling
    alone. Below budget 1 the model is traced whole (``compose_blocks`` applies at budget 1 only):
    the partitioner's knapsack spreads its budget unevenly over identical blocks, and a plan
    composed from three of them was off by a third of the saved bytes. It is traced once: each
    further budget splits the same joint graphs again (a 7B-shaped model: about 100 s for the
    first budget below 1, 25 s for each after it). Under recompute the
    analysis reads the sampled partition itself (traced with every candidate at 0.3): the
    solver chooses the ratios of the ``frees`` groups, and every other group is sampled at 0.3
    as traced (see :mod:`wtacompile.passes.analyze_savings`). The
    largest-batch search is at the first budget. The plan's
    ``predicted_step_time`` (:mod:`wtacompile.time_model`) is relative to dense training at the
    first budget (1 by default), on ``device_type`` (default: the model's; ``"cuda"`` for a model
    on the meta device).

    Works on a model built on the meta device (nothing is allocated) and on a real one (its
    parameters and buffers are swapped for fake twins while it is traced, then put back).
    ``example_inputs`` (keyword dict or positional tuple) fixes the batch; otherwise inputs come
    from the model's config at ``batch_size`` × ``seq_len``. With ``batch_size=None`` the plan is
    for the largest batch that fits with sampling; the search stops at ``max_batch`` (a plan whose
    largest batch reaches it says that larger ones may fit too). A model that runs batch 1 only (a
    decoder's sequence classifier without ``config.pad_token_id``) plans at ``batch_size=1``,
    with 1 as its largest batch and the reason in ``Plan.max_batch_reason``; asked for the largest
    batch or any other, a ``ValueError`` names the fix.
    ``seq_len`` given with
    ``example_inputs`` must match their length. A budget that cannot be met gives a plan with
    ``fits=False`` and advice; a sequence longer than the model's learned position table, a
    ``ValueError`` saying so.

    ``world_size`` plans one rank of fully sharded data-parallel training (FSDP2 ``fully_shard``,
    ZeRO-3): parameters, gradients and optimizer state are split ``world_size`` ways; each rank
    keeps the activations of its own batch (``batch_size`` is per rank). The all-gathered
    parameters of the units in flight are not counted. For DDP leave it at 1 (nothing is sharded).
    A model wrapped by PEFT (``get_peft_model``) plans its adapters on the frozen base.

    ``compose_blocks``: at partitioner budget 1, trace three blocks of each run of identical
    blocks (a transformer's layers: the first, one standing for the middle ones, the last) and
    compose the model from them (:mod:`wtacompile.planning.blocks`; the same numbers, in a
    fraction of the time); ``False`` traces every block.

    ``reuse_traces``: a later plan of the same model, inputs and settings (another ``mem_gb``,
    say) reuses the graphs this one traced and analysed, and only solves again: milliseconds
    instead of the seconds to minutes of tracing (:mod:`wtacompile.planning.trace_cache` says
    what must match). ``False`` traces afresh, e.g. after changing something the cache cannot
    see, such as a monkeypatched function the model calls.

    ``parallel_traces``: at partitioner budget 1, the traces of one graph that need nothing from
    each other (dense at the traced batch; sampled, for the verdicts; in the largest-batch search
    also dense at one batch row more, for the slopes) run at the same time, all but the first in
    forked processes (Linux, two or more cores, CUDA not initialised in this process:
    :mod:`wtacompile.analysis.forked`); the same numbers.
    ``False`` traces them one after another in this process.
    """
    _check_arguments(mem_gb, batch_size, seq_len, example_inputs, max_batch, world_size, reuse_traces)
    if not isinstance(parallel_traces, bool):
        raise ValueError(f"parallel_traces must be True or False, got {parallel_traces!r}")
    budgets = _check_budgets(activation_budgets) if inner != "eager" else (1.0,)  # eager: no partitioner
    # match_budget_bytes off: each budget is analysed at itself, the one that fits the plan's
    # bytes. mem_gb: the budgets are the search's, not the user's (the analysis says so in info).
    config = WTAConfig(keep_ratio=0.3, min_rows=min_rows, include=include, exclude=exclude,
                       inner=inner, optimizer=optimizer, match_budget_bytes=False, mem_gb=mem_gb)
    planned_device = device_type or _device_of(model)
    balance = balance_for(planned_device)
    budget = int(mem_gb * 1e9)
    if example_inputs is not None:
        trace_batch = _batch_of(example_inputs)
        if batch_size is not None and batch_size != trace_batch:
            raise ValueError(f"batch_size={batch_size} but example_inputs have batch {trace_batch}")
        traced_length = _sequence_length(example_inputs)
        if seq_len is not None and traced_length is not None and seq_len != traced_length:
            raise ValueError(f"seq_len={seq_len} but example_inputs have sequence length {traced_length} "
                             "(dim 1 of the first token-id tensor): leave seq_len out, or pass inputs "
                             "of that length")
        batch_size, inputs = trace_batch, example_inputs
    else:
        trace_batch = batch_size or 2  # 2: batch sizes 0 and 1 are never symbolic
        inputs = default_example_inputs(model, trace_batch, seq_len)
    search = batch_size is None
    max_batch_reason = batch_one_only(model) or ""
    if max_batch_reason:
        if trace_batch != 1:
            raise ValueError(f"{max_batch_reason}: the model runs batch 1 only. Set its config's pad_token_id "
                             "(the tokenizer's pad_token_id, or its eos_token_id if it has none), or plan at "
                             "batch_size=1")
        max_batch = 1
    # A 7B-shaped model traces for tens of seconds: say what is happening (silent off a terminal).
    with tqdm(total=2 * len(budgets), desc="wtacompile.plan", unit="stage", disable=None,
              leave=False) as progress:
        dense: list[CompileState] | None = None  # the first budget's graphs: the baseline
        tried: list[Plan] = []
        symbolic_batch = trace_batch if search else None

        @functools.cache  # once per plan, at the first budget that traces the whole model
        def whole_model_graphs() -> CapturedGraphs:
            def capture_whole() -> list[CapturedGraphs]:
                return [capture_graphs(model, inputs, symbolic_batch)]

            if not reuse_traces:
                return capture_whole()[0]
            # Kept for later plans at any partitioner budget: dynamo's graphs do not depend on it.
            return trace_cache.cached_capture(model, lambda: trace_cache.trace_key(
                model, inputs, dataclasses.replace(config, activation_memory_budget=None),
                symbolic_batch, False, planned_device, purpose="captured graphs"), capture_whole)[0][0]

        def attempt(partitioner: float) -> Plan | None:
            nonlocal dense
            progress.set_postfix_str(f"tracing and analysing the training graphs "
                                     f"(activation_memory_budget {partitioner:g})")
            at_budget = dataclasses.replace(config, activation_memory_budget=partitioner)
            # Below budget 1 the knapsack does not treat the copies of a block alike (of six
            # identical inputs it may keep four), so a few traced blocks do not compose.
            composed = compose_blocks and partitioner >= 1.0

            def capture() -> list[CompileState]:
                with target_device(planned_device):  # a meta model traces on CPU fakes, planned for a GPU
                    if composed:
                        return _capture(model, inputs, at_budget, symbolic_batch)
                    # The whole model is captured once for every budget: each analyses the same
                    # graphs, splitting the joint graphs the first one traced.
                    graphs = whole_model_graphs()
                    if graphs.joints:
                        progress.set_postfix_str(f"analysing the captured graphs, splitting those traced "
                                                 f"before again (activation_memory_budget {partitioner:g})")
                    return analyse_graphs(graphs, at_budget)

            with traces_in_parallel(parallel_traces):
                if reuse_traces:
                    states, reused = trace_cache.cached_capture(model, lambda: trace_cache.trace_key(
                        model, inputs, at_budget, symbolic_batch, composed, planned_device), capture)
                    if reused:
                        progress.set_postfix_str("reusing the graphs an earlier plan traced")
                else:
                    states = capture()
            dense = dense or states
            progress.update()
            progress.set_postfix_str("searching the largest batch" if search else "solving")
            tried.append(dataclasses.replace(
                _solve_plan(model, states, dense, partitioner, balance, budget, mem_gb, batch_size, seq_len,
                            trace_batch, optimizer, menu, min_rows, max_batch, world_size),
                max_batch_reason=max_batch_reason))
            progress.update()
            return tried[-1] if tried[-1].fits else None

        try:
            first = attempt(budgets[0])
        except Exception as error:
            hint = _position_limit_hint(model, inputs)
            if hint is None:
                raise
            raise ValueError(hint) from error
        if first is not None or len(budgets) == 1 or _state_alone(tried[-1]) > budget:
            return tried[-1]  # (no recompute shrinks parameters, gradients and optimizer state)
        found = fastest_fitting(budgets[1:], attempt, lambda p: bool(p.keep_ratios),
                                lambda p: p.predicted_step_time)
        return found[1] if found else tried[-1]  # nothing fits: the smallest budget's plan


def _state_alone(plan: Plan) -> int:
    """The optimizer step's peak: parameters, gradients, optimizer state and step temporaries."""
    b = plan.breakdown
    return b["parameters"] + b["gradients"] + b["optimizer"] + b["step_temporaries"]


def _check_budgets(budgets) -> tuple[float, ...]:
    if isinstance(budgets, (int, float)):
        budgets = (budgets,)
    budgets = tuple(budgets)
    if not budgets:
        raise ValueError("activation_budgets must name at least one partitioner budget, e.g. (1.0,)")
    for b in budgets:
        check_activation_memory_budget(b)
    return tuple(sorted({float(b) for b in budgets}, reverse=True))


def _device_of(model: torch.nn.Module) -> str:
    """The device type the model trains on; a meta model is planned for a GPU."""
    device = next((p.device.type for p in model.parameters()), "cpu")
    return "cuda" if device == "meta" else device


def _capture(model, inputs, config, symbolic_batch) -> list[CompileState]:
    """The model's analysed graphs: composed from three blocks per run where blocks repeat."""
    runs = find_repeated_blocks(model)
    if runs:
        try:
            with one_block_per_run(model, runs):
                states = capture_analyses(model, inputs, config, symbolic_batch)
            return compose_states(states, runs)
        except Exception as error:  # noqa: BLE001 - any failure here is retried the slow way, loudly
            warnings.warn(f"plan(): could not plan from three blocks per run of repeated blocks "
                          f"({type(error).__name__}: {error}); tracing every block instead (slower; "
                          f"compose_blocks=False skips the attempt)", stacklevel=3)
    return capture_analyses(model, inputs, config, symbolic_batch)


def _memory_model(states, parameter_state, trace_batch, min_rows) -> MemoryModel:
    return MemoryModel(
        *parameter_state,
        graphs=tuple(s.analysis.memory for s in states),
        inputs=tuple(i for gi, s in enumerate(states)
                     for i in s.analysis.sampleable_inputs(s.sites, prefix=f"{gi}:")),
        trace_batch=trace_batch,
        min_rows=min_rows,
    )


def _solve_plan(model, states, dense_states, partitioner, balance, budget, mem_gb, batch_size, seq_len,
                trace_batch, optimizer, menu, min_rows, max_batch, world_size) -> Plan:
    """The plan at partitioner budget ``partitioner`` (``states`` traced under it); the baseline
    figures are dense training's at budget 1 (``dense_states``)."""
    unsharded = parameter_bytes(model.parameters(), optimizer)
    mm = _memory_model(states, _sharded(unsharded, world_size), trace_batch, min_rows)
    dense_mm = mm if dense_states is states else _memory_model(dense_states, _sharded(unsharded, world_size),
                                                               trace_batch, min_rows)

    def solve_at(batch: int) -> Solution:
        return solve(mm.choices_at(batch, menu), budget - mm.fixed_at(batch))

    # Sizes are affine in the batch: the lines give the answer, an exact check confirms it.
    baseline_max = _largest_near(lambda b: dense_mm.peak(b) <= budget, dense_mm.batch_estimate(budget),
                                 max_batch)
    sampled_max = _largest_near(lambda b: solve_at(b).feasible and mm.step_peak() <= budget,
                                mm.batch_estimate(budget, min(menu)), max_batch)
    batch = batch_size if batch_size is not None else max(sampled_max, 1)
    solution = solve_at(batch)
    peak = mm.peak(batch, solution.ratios)
    fits = solution.feasible and peak <= budget
    need = max(mm.fixed_at(batch) + solution.min_bytes, mm.step_peak())
    activations = mm.planned_activations(batch, solution.ratios)
    step_time = _step_time(states, dense_states, mm, solution, batch / trace_batch, balance)
    return Plan(
        mem_gb=mem_gb, fits=fits, batch_size=batch, seq_len=seq_len, peak_bytes=peak,
        baseline_peak_bytes=dense_mm.peak(batch), activation_bytes=activations,
        baseline_activation_bytes=dense_mm.activations(batch), max_batch_size=sampled_max,
        baseline_max_batch_size=baseline_max, max_batch=max_batch,
        keep_ratios=_keep_ratios(mm, solution, states),
        breakdown={
            "parameters": mm.parameters, "gradients": mm.gradients, "optimizer": mm.optimizer,
            "activations": activations, "transient": mm.transient(batch),
            "baseline_activations": dense_mm.activations(batch), "baseline_transient": dense_mm.transient(batch),
            "step_temporaries": mm.step_temporaries,
        },
        layers=_layers(mm, states, solution, batch),
        optimizer=optimizer,
        advice="" if fits else _advice(mm, budget, batch, need, sampled_max, menu,
                                       _fsdp_world_size(mm, unsharded, world_size, budget, batch, menu)),
        min_peak_bytes=need,
        activation_memory_budget=partitioner,
        predicted_step_time=round(step_time, 4),
    )


def _step_time(states, dense_states, mm: MemoryModel, solution: Solution, scale: float,
               balance: float) -> float:
    """Predicted step time relative to ``dense_states``, at ``scale`` × the traced batch (the
    graphs' work scales with the batch; the kept rows are counted at the planned batch)."""
    def scaled(cost: GraphCost) -> GraphCost:
        return GraphCost(cost.flops * scale, cost.bytes * scale)

    sampled = []
    gradient_aware = bool(states) and states[0].config.row_scores == "gradient"
    for i in mm.inputs:
        ratio = solution.ratios[i.key]
        if ratio < 1.0:
            linear = i.sampled_linear()
            linear = dataclasses.replace(linear, rows=max(1, round(linear.rows * scale)),
                                         gradient_aware=gradient_aware)
            sampled.append((linear, num_kept_rows(linear.rows, ratio, mm.min_rows)))
    for state in states:  # the groups sampled as traced (under recompute)
        as_traced = state.analysis.traced_ratios(state.sites)
        sites = {s.weight: s for s in state.sites}
        for group in state.analysis.groups:
            if group.weights[0] in as_traced:
                readers = [sites[w] for w in group.weights]
                linear = sampled_linear(readers, gradient_aware, max(1, round(readers[0].rows * scale)))
                sampled.append((linear, num_kept_rows(linear.rows, as_traced[group.weights[0]], mm.min_rows)))
    return step_time_ratio([scaled(s.analysis.cost) for s in states], sampled,
                           [scaled(s.analysis.cost) for s in dense_states], balance)


def _check_arguments(mem_gb, batch_size, seq_len, example_inputs, max_batch, world_size, reuse_traces) -> None:
    """One ``ValueError`` per bad argument, naming the fix, before any tracing."""
    check_mem_gb(mem_gb)
    if not isinstance(reuse_traces, bool):
        raise ValueError(f"reuse_traces must be True or False, got {reuse_traces!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("max_batch", max_batch),
                        ("world_size", world_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int"
                             + (" or None" if name in ("batch_size", "seq_len") else "") + f", got {value!r}")
    if example_inputs is not None:
        if not isinstance(example_inputs, (Mapping, tuple, list)):
            raise ValueError("example_inputs must be a dict of keyword inputs or a tuple of positional "
                             f"ones, got {type(example_inputs).__name__}")
        if not any(isinstance(v, torch.Tensor) for v in _values(example_inputs)):
            raise ValueError("example_inputs holds no tensor: pass the model's inputs "
                             "(e.g. {'input_ids': ids, 'labels': ids}) or leave it out and give seq_len")


def _values(example_inputs) -> list[Any]:
    return list(example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs)


def _sequence_length(inputs) -> int | None:
    """Dim 1 of the first integer tensor input of two or more dims (token ids), if any."""
    for value in _values(inputs):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and not value.is_floating_point():
            return int(value.shape[1])
    return None


def _position_limit_hint(model: torch.nn.Module, inputs) -> str | None:
    """Why tracing failed, where the sequence is longer than the model's learned position table
    (BERT's and GPT-2's absolute positions: the forward fails at any batch; rotary or relative
    positions have no such table and are never blamed)."""
    length = _sequence_length(inputs)
    if length is None:
        return None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(module, torch.nn.Embedding) and ("pos" in leaf or leaf == "wpe") \
                and module.num_embeddings < length:
            return (f"the sequence ({length} tokens) is longer than the model's position table "
                    f"{name} ({module.num_embeddings} positions): plan with seq_len <= "
                    f"{module.num_embeddings}")
    return None


def _batch_of(example_inputs) -> int:
    """The batch size: the leading dim of the first tensor input with one."""
    for value in _values(example_inputs):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("example_inputs has no batched tensor (every tensor is 0-d)")


def _keep_ratios(mm: MemoryModel, solution: Solution, states: list[CompileState]) -> dict[str, float]:
    """The solver's ratios, and those of the groups sampled as traced (under recompute)."""
    ratios = {r.weight: solution.ratios[i.key] for i in mm.inputs for r in i.readers
              if solution.ratios[i.key] < 1.0}
    for state in states:
        ratios.update(state.analysis.traced_ratios(state.sites))
    return ratios


def _layers(mm: MemoryModel, states: list[CompileState], solution: Solution, batch: int
            ) -> tuple[LayerPlan, ...]:
    """One row per candidate linear: the sampleable ones with their ratio, then the others."""
    scale = batch / mm.trace_batch
    layers = []
    for i in mm.inputs:
        ratio = solution.ratios[i.key]
        dense = i.bytes_at(batch, mm.trace_batch)
        kept = dense if ratio == 1.0 else i.compact_bytes_at(ratio, batch, mm.trace_batch, mm.min_rows)
        reason = "budget met without sampling it" if ratio == 1.0 else ""
        for r in i.readers:
            layers.append(LayerPlan(r.weight, r.in_features, r.out_features, round(r.rows * scale),
                                    dense // len(i.readers), kept // len(i.readers), ratio, reason))
    for state in states:
        sites = {s.weight: s for s in state.sites}
        as_traced = state.analysis.traced_ratios(state.sites)
        for group in state.analysis.groups:
            if group.verdict != FREES:
                for w in group.weights:
                    s = sites[w]
                    reason = group.reason + ("; sampled as analysed (under recompute)" if w in as_traced else "")
                    layers.append(LayerPlan(w, s.in_features, s.out_features, round(s.rows * scale),
                                            0, 0, as_traced.get(w, 1.0), reason))
    return tuple(layers)


def _sharded(parameter_state: tuple[int, ...], world_size: int) -> tuple[int, ...]:
    """Parameters, gradients, optimizer state and step temporaries of one of ``world_size`` FSDP
    ranks (each split evenly, rounded up)."""
    return tuple(-(-nbytes // world_size) for nbytes in parameter_state)


def _fsdp_world_size(mm: MemoryModel, unsharded: tuple[int, ...], world_size: int, budget: int,
                     batch: int, menu, limit: int = 1024) -> int | None:
    """The smallest FSDP world size (a power of two above ``world_size``, at most ``limit``) at
    which batch ``batch`` per rank fits, re-solving the same memory model with the parameter
    state sharded; ``None`` if none does (activations alone are too large)."""
    ws = world_size * 2
    while ws <= limit:
        sharded = dataclasses.replace(mm, **dict(zip(("parameters", "gradients", "optimizer", "step_temporaries"),
                                                     _sharded(unsharded, ws))))
        if (solve(sharded.choices_at(batch, menu), budget - sharded.fixed_at(batch)).feasible
                and sharded.step_peak() <= budget):
            return ws
        ws *= 2
    return None


def _advice(mm: MemoryModel, budget: int, batch: int, need: int, sampled_max: int, menu,
            fsdp_world_size: int | None = None) -> str:
    fsdp = (f"; or FSDP over {fsdp_world_size} devices (plan(..., world_size={fsdp_world_size}))"
            if fsdp_world_size else "")
    if mm.step_peak() > budget:
        hint = (f"LoRA (peft), frozen layers or lower-precision weights (parameters, gradients and "
                f"optimizer state alone need {format_bytes(mm.step_peak())}){fsdp}")
    elif sampled_max >= 1:
        hint = f"a batch of at most {sampled_max}{fsdp}"
    else:
        hint = f"shorter sequences, activation checkpointing or a larger budget{fsdp}"
    # The table shows each ratio the solver kept; where min_rows makes a larger ratio keep as
    # many rows as the smallest, it shows the larger (same bytes, less variance).
    return (f"Does not fit: batch {batch} needs at least {format_bytes(need)} even at "
            f"the smallest keep ratio {min(menu)} (at least {mm.min_rows} rows per input); try {hint}.")


def _largest_near(fits, guess: int, limit: int) -> int:
    """The largest batch in [1, limit] for which ``fits`` holds (0 if none; ``fits`` is monotone),
    searched outward from ``guess``: two calls when the guess is right, O(log error) otherwise."""
    if not fits(1):
        return 0
    guess = min(max(guess, 1), limit)
    if fits(guess):
        lo, step = guess, 1
        while lo + step <= limit and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, limit + 1)
    else:
        hi, step = guess, 1
        while hi - step > 1 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
