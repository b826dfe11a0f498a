"""Decide which linears to sample: only those whose full input sampling actually releases.

Why: sampling a linear saves its *weight-gradient* copy of ``x`` only. The memory comes back only
if nothing else keeps ``x`` for backward — and often something does: q/k/v share one input, an
activation's backward may need the very tensor the next linear reads, and the partitioner may save
a tensor or recompute it from another one it keeps anyway. Those facts live in the AOTAutograd
joint graph and the partitioner's choice of saved tensors, not in the model code.

How: trace the graph through AOTAutograd twice, with the same decompositions, min-cut
partitioner and partitioner budget (``config.activation_memory_budget``) the inner compiler uses: once as it is (dense) and once with every candidate
(trainable weight, allowed by include/exclude, ratio < 1) sampled, one sample per input. For each
sampled input, resolved through views to its storage root ``R``:

* ``R`` is still saved, or recomputed in backward, in the sampled trace (another op's backward
  needs it), or the dense trace does not save it either (the partitioner recomputes it from
  something it keeps anyway, e.g. a GELU output from its input): sampling frees no memory. If the
  partitioner then also saves the compact rows, sampling would add them: ``adds-memory``. If it
  recomputes them from ``R`` in backward (a gather is cheap): ``frees-nothing`` — memory is
  unchanged and the weight-gradient GEMMs run on ``k`` rows instead of ``N``.
* otherwise → ``frees``: sampling releases ``bytes(R)`` minus the compact rows.

Under a partitioner budget below 1 the dense trace is no reference: its knapsack recomputes
inputs the sampled trace's knapsack, with the compact rows pinned, balances differently (measured:
sampling all of Llama's linears at budget 0.5 saves 16% fewer bytes than the budget alone, where
the dense-minus-freed reading found nothing to free). There the verdicts and the memory come from
the sampled partition itself (:func:`_recompute_verdict`): an input sampling leaves neither
saved nor recomputed, whose rows are saved, ``frees``; and the graph's memory is the sampled
partition's with each such input's compact rows counted as the whole input — the exact
alternative, an upper bound (the partitioner might recompute it) — so that the memory model's
"input minus its compact rows" gives back the sampled partition at any ratio.

A budget is a fraction of each graph's own range of saved bytes (from the graph's inputs alone
to the runtime-optimal set), and sampling shrinks that range: at the user's budget ``B`` the
sampled partition recomputes down to well under what ``B``'s dense partition saves. So where the
budget is the user's (``WTAConfig.match_budget_bytes``; not one ``mem_gb`` or a plan chose), the
sampled joint graph is split at budgets of ``1, 0.9, …`` above ``B`` (one trace; the budgets
bisected, a partition each) and compiled at the largest whose split saves at most
:data:`RAISED_BYTES_HEADROOM` of the dense partition's bytes at ``B``: the memory asked for, with
less recompute.

The two traces name their nodes differently, so tensors are matched by provenance: the dynamo
node they came from plus numel, dtype and ordinal
(:func:`wtacompile.analysis.graph_numbers.provenance_keys`).

Returns the state with ``analysis``: the groups with their verdicts and sizes, and the numbers
for the memory model (the dense partition's; below budget 1 the sampled one's, as above). Neither ``gm`` nor the sites change; weighing the
compact copies against the input at the chosen ratio is the policy's job
(:mod:`wtacompile.passes.choose_ratios`).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx

from wtacompile._compat import dynamo_origin, is_storage_view, joint_parameter_inputs, storage_root
from wtacompile.analysis.graph_cost import graph_cost, with_recompute_of
from wtacompile.analysis.graph_numbers import Sizer, graph_memory, provenance_keys, saved_bytes, slopes_match
from wtacompile.analysis.partition_trace import (PartitionTrace, batch_symbols_of, copy_module, has_subgraph_calls,
                                                trace_joint, trace_largest_fitting, trace_partition)
from wtacompile.config import WTAConfig
from wtacompile.lower import SAVED_DTYPE, effective_partitioner_budget, expose_samples, sampled_storage
from wtacompile.memory_model import Size
from wtacompile.sites import ADDS_MEMORY, FREES, FREES_NOTHING, InputGroup, SavingsAnalysis
from .compile_state import CompileState
from .rewrite_sampled import Rewritten, fresh_states, rewrite_sites

__all__ = ["analyze_savings", "raised_budgets"]

log = logging.getLogger("wtacompile")

#: A sampled graph is compiled at a raised partitioner budget only where the analysis finds it
#: saving at most this fraction of the dense partition's bytes at the user's budget.
RAISED_BYTES_HEADROOM = 0.99


def analyze_savings(gm: fx.GraphModule, state: CompileState) -> CompileState:
    """Trace dense and all-candidates-sampled; group the candidates by input, with verdicts."""
    config = state.config
    # The eager inner compiler has no partitioner: torch's budget does not apply to it.
    partitions = config.inner != "eager"
    under_recompute = partitions and effective_partitioner_budget(config) < 1.0
    dense, dense_sizer = _dense_trace(gm, config, under_recompute)
    parameters = joint_parameter_inputs(gm, dense.joint)
    fuses = config.inner == "inductor"
    memory = graph_memory(dense, parameters, dense_sizer, fuses)
    cost = graph_cost(dense)
    candidates = [site for site in state.sites if site.skip_reason is None]
    if not candidates:
        return dataclasses.replace(state, analysis=SavingsAnalysis((), (), memory, cost))
    trial = copy_module(gm)
    # At budget 1 the sampled trace gives verdicts only, and those are structure: whether the
    # partition still keeps each input. Gradient-aware scores add the row cells and the learned
    # states (read by the draw in forward, written from dY in backward), none of which touches
    # x, so the trace is made with norm-only scores: about half the nodes (plans of eight
    # families identical either way). Under recompute the sampled partition's own bytes are
    # the memory, so it is traced as it will be compiled.
    rewritten = rewrite_sites(trial, candidates, {s.weight: s.requested_ratio for s in candidates}, config,
                              fresh_states if under_recompute else None)
    expose_samples(trial)  # as the real compile will: the draw stays in forward
    # Under a budget the user set, the sampled graph may be compiled at a larger one: where its
    # partition still saves no more than the dense one at the user's budget, it recomputes less.
    # The headroom: the analysis sizes what the partition saves, not every detail of what Inductor
    # then allocates (measured before the headroom: a Llama raised to the exact bytes saved
    # 0.06% more than the budget alone).
    allowed = memory.activations.traced * RAISED_BYTES_HEADROOM

    def saves_no_more(split: PartitionTrace) -> bool:
        split_parameters = joint_parameter_inputs(trial, split.joint)
        return saved_bytes(split, split_parameters, Sizer(split.joint, split_parameters)).traced <= allowed

    # Verdicts are structure, not sizes: trace at the traced sizes (half the cost of a symbolic
    # trace) and size each input from its twin in the dense trace. Not under a partitioner budget
    # below 1: its knapsack sizes every input, and a symbolic scalar traced as its hint has none.
    sampled, raised_to = trace_largest_fitting(trial, config, raised_budgets(config) if under_recompute else (),
                                             saves_no_more, static=not under_recompute)
    raised_from = None
    if raised_to is not None:
        raised_from = effective_partitioner_budget(config)
        log.info("wtacrs: compiled at activation_memory_budget %g instead of %g: there the sampled "
                 "partition saves no more than the dense one at %g, and recomputes less",
                 raised_to, raised_from, raised_from)
        config = dataclasses.replace(config, activation_memory_budget=raised_to)
        state = dataclasses.replace(state, config=config)
    groups, compact = _group_by_input(dense, sampled, rewritten, dense_sizer, under_recompute, partitions)
    grouped = {w for group in groups for w in group.weights}
    untraced = tuple(s.weight for s in candidates if s.weight not in grouped)
    if not under_recompute:
        return dataclasses.replace(state, analysis=SavingsAnalysis(groups, untraced, memory, cost))
    sampled_parameters = joint_parameter_inputs(trial, sampled.joint)
    sizer = Sizer(sampled.joint, sampled_parameters)
    as_traced = saved_bytes(sampled, sampled_parameters, sizer).traced
    if as_traced > memory.activations.traced:
        # The knapsack balances the sampled graph differently (its ratio of saved bytes is
        # relative to that graph's own extremes), and here to more bytes: sampling would cost
        # memory the user set a budget to save. Compile this graph dense.
        budget = effective_partitioner_budget(config)
        (log.info if config.mem_gb is not None else log.warning)(
            "wtacrs: under activation_memory_budget %g the sampled partition of this graph saves "
            "%d bytes against the dense partition's %d; its linears stay exact", budget, as_traced,
            memory.activations.traced)
        reason = (f"under activation_memory_budget {budget:g} the sampled partition would save "
                  f"more than the dense one ({as_traced} against {memory.activations.traced} bytes)")
        groups = tuple(dataclasses.replace(g, verdict=ADDS_MEMORY, reason=reason, input_saved=False) for g in groups)
        return dataclasses.replace(state, analysis=SavingsAnalysis(groups, untraced, memory, cost))
    memory = graph_memory(sampled, sampled_parameters, _AsIfExact(
        sizer, {name: size for group, rows in zip(groups, compact) if group.verdict == FREES for name, size in rows}),
        fuses)
    # The sampled partition's own recompute, not the dense one's (at a raised budget, less).
    cost = with_recompute_of(cost, dense, sampled)
    return dataclasses.replace(state, analysis=SavingsAnalysis(
        groups, untraced, memory, cost, under_recompute=True, raised_from=raised_from))


def _dense_trace(gm: fx.GraphModule, config: WTAConfig, under_recompute: bool) -> tuple[PartitionTrace, Sizer]:
    """The dense partition of ``gm`` and a :class:`Sizer` of its nodes.

    A graph with a symbolic batch (a plan's search for the largest batch) needs each size as a
    line in the batch. At partitioner budget 1 two static traces give it, at ``b₀`` (partitioned)
    and at ``b₀ + 1`` (the joint graph only), in about two thirds of the time of one symbolic
    trace (7B Llama shape, three blocks); where the two do not match (:func:`slopes_match`), the
    second fails, or the graph calls ``invoke_subgraph``, the symbolic trace is made instead.
    The saved bytes are the symbolic trace's, number for number (its slope is also the size at
    ``b₀ + 1`` minus ``b₀``). The backward can differ a little: a symbolic trace cannot prove a
    slice of the whole tensor a no-op (Llama's ``logits_to_keep``), and backpropagates it by
    scattering into zeros; the static compile a user trains with at a fixed batch drops the
    slice, as the static traces do.
    Below budget 1 the knapsack weighs sizes that a static trace at ``b₀`` may weigh otherwise
    than the real, symbolic compile: the graph is traced symbolically, as it was captured.
    """
    batch = batch_symbols_of(gm) if not under_recompute and not has_subgraph_calls(gm) else None
    if batch is not None:
        symbols, traced_batch = batch
        dense = trace_partition(gm, config, static=True)
        try:
            next_batch = trace_joint(gm, config, dict.fromkeys(symbols, traced_batch + 1))
        except Exception as error:  # noqa: BLE001 - the symbolic trace below is the answer then
            log.warning("wtacrs: tracing the graph at batch %d failed (%s: %s); tracing it with a "
                        "symbolic batch instead (slower)", traced_batch + 1, type(error).__name__, error)
        else:
            if slopes_match(dense, next_batch):
                return dense, Sizer(dense.joint, joint_parameter_inputs(gm, dense.joint), next_batch)
            log.info("wtacrs: the joint graph traced at batch %d differs from the one at %d; "
                     "tracing it with a symbolic batch instead", traced_batch + 1, traced_batch)
    dense = trace_partition(gm, config)
    return dense, Sizer(dense.joint, joint_parameter_inputs(gm, dense.joint))


def raised_budgets(config: WTAConfig) -> tuple[float, ...]:
    """The partitioner budgets above ``config``'s (``B``) to try the sampled graph at: ``1, 0.9,
    …`` down to the last above ``B`` — where ``config.match_budget_bytes`` is on
    and the budget is the user's (not one ``mem_gb`` or a plan chose, which fit their own bytes)."""
    if not config.match_budget_bytes or config.mem_gb is not None:
        return ()
    budget = effective_partitioner_budget(config)
    return tuple(b for b in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1) if b > budget + 1e-9)


class _AsIfExact:
    """A :class:`Sizer` that sizes the named nodes (a sampled input's compact rows and indices)
    as given instead: the rows as the whole input, the indices as nothing."""

    def __init__(self, sizer: Sizer, sizes: dict[str, Size]) -> None:
        self._sizer, self._sizes = sizer, sizes

    @property
    def symbolic(self) -> bool:
        return self._sizer.symbolic

    def __call__(self, node: fx.Node) -> Size:
        size = self._sizes.get(node.name)
        return self._sizer(node) if size is None else size


def _group_by_input(dense: PartitionTrace, sampled: PartitionTrace, rewritten: Rewritten,
                    sizer: Sizer, under_recompute: bool, inner_partitions: bool
                    ) -> tuple[tuple[InputGroup, ...], list[list[tuple[str, Size]]]]:
    """The groups, and per group (in order) the saved compact-row nodes of the sampled trace with
    the sizes :class:`_AsIfExact` gives them. ``sizer`` sizes nodes of the dense trace."""
    samples = rewritten.samples
    dense_keys = provenance_keys(dense.joint, {})
    dense_saved = {dense_keys[name] for name in dense.saved_roots if name in dense_keys}
    dense_by_key = {key: dense.joint_nodes[name] for name, key in dense_keys.items()}
    keys = provenance_keys(sampled.joint, rewritten.renamed)
    saved = [sampled.joint_nodes[name] for name in sampled.saved_roots if name in sampled.joint_nodes]
    # Saved only when sampling, and not by a sampled linear itself: candidates for kept-instead.
    saved_only_sampled = [n for n in saved if keys.get(n.name) not in dense_saved
                          and dynamo_origin(n) not in rewritten.renamed]
    groups, compact = [], []
    for node in sampled.joint.graph.find_nodes(op="call_function", target=torch.ops.wtacompile.sample_rows.default):
        origin = dynamo_origin(node)
        if origin not in samples:
            continue
        root = sampled_storage(node)
        twin = dense_by_key.get(keys.get(root.name))
        if twin is None:
            raise RuntimeError(f"wtacrs analysis: sampled input {root.name} has no twin in the dense trace")
        # The sample's saved tensors: its compact rows (k × D) and indices (k).
        rows = [n for n in saved if dynamo_origin(n) == origin and n.meta["val"].dim() in (1, 2)]
        compact_saved = any(n.meta["val"].dim() == 2 for n in rows)
        if under_recompute:
            verdict, reason = _recompute_verdict(sampled, root.name, compact_saved)
        else:
            verdict, reason = _verdict(sampled, root.name, keys.get(root.name) in dense_saved, compact_saved)
        zero = sizer(twin) * 0
        compact.append([(n.name, sizer(twin) if n.meta["val"].dim() == 2 else zero) for n in rows])
        # Only a partitioner gathers rows in backward (the eager inner compiler saves the copy).
        input_saved = root.name in sampled.saved_roots and inner_partitions
        # Under recompute the sampled partition's own bytes are the memory: nothing to add.
        kept = None if under_recompute or verdict != FREES else _kept_instead(
            root, saved_only_sampled, origin, sizer(twin))
        groups.append(InputGroup(root.name, tuple(s.weight for s in samples[origin]), sizer(twin),
                                 verdict, reason, input_saved, kept))
    return tuple(groups), compact


def _kept_instead(root: fx.Node, saved: list[fx.Node], origin: str, root_size: Size) -> Size | None:
    """What the sampled partition saves, and the dense one does not, computed from ``root`` (not
    the sample's own rows): a ReLU's ``out <= 0`` once the output itself is not saved. ``saved``:
    the sampled partition's saved nodes the dense one lacks. Sized from ``root``'s dense size
    by numel and saved item size (affine in the batch like it). The sampled linears' own values
    (their outputs, traced from the rewritten calls) are not candidates."""
    value = root.meta["val"]
    whole = value.numel() * value.element_size()
    kept = None
    for node in saved:
        if dynamo_origin(node) == origin or node is root or not any(
                storage_root(a) is root for a in node.all_input_nodes):
            continue
        own = node.meta["val"]
        share = own.numel() * node.meta.get(SAVED_DTYPE, own.dtype).itemsize
        size = Size(root_size.traced * share // whole,
                    None if root_size.per_batch is None else root_size.per_batch * share // whole)
        kept = size if kept is None else kept + size
    return kept


def _needed_anyway(trace: PartitionTrace, root: str, compact_saved: bool) -> tuple[str, str] | None:
    """The verdict where the sampled trace still saves or recomputes the whole input."""
    if (not compact_saved and root not in trace.saved_roots and root in trace.recomputed
            and _only_gathered(trace, root)):
        # Memory-neutral like any recompute; Inductor fuses the gather into the recomputed
        # row-local chain, so that part runs on the kept rows only.
        return FREES_NOTHING, "recomputed in backward only to gather the kept rows"
    if root in trace.saved_roots or root in trace.recomputed:
        where = "stays saved" if root in trace.saved_roots else "is recomputed"
        if compact_saved:
            return ADDS_MEMORY, f"full input {where} for another op's backward; the rows would add"
        return FREES_NOTHING, f"full input {where} for another op's backward"
    return None


_ROW_GATHERS = (torch.ops.aten.index_select.default, torch.ops.aten.index.Tensor)


def _only_gathered(trace: PartitionTrace, root: str) -> bool:
    """Whether the backward reads the recomputed ``root`` only through row gathers (views of it
    included)."""
    node = next((n for n in trace.backward.graph.nodes if n.name == root), None)
    if node is None:
        return False
    pending, gathers = list(node.users), 0
    while pending:
        user = pending.pop()
        if is_storage_view(user):
            pending.extend(user.users)
        elif user.target in _ROW_GATHERS:
            gathers += 1
        else:
            return False
    return gathers > 0


def _verdict(trace: PartitionTrace, root: str, dense_saves_it: bool, compact_saved: bool
             ) -> tuple[str, str]:
    needed = _needed_anyway(trace, root, compact_saved)
    if needed is not None:
        return needed
    if not dense_saves_it:
        if compact_saved:
            return ADDS_MEMORY, "dense training recomputes this input; the rows would add"
        return FREES_NOTHING, "dense training does not save this input either (recomputes it)"
    return FREES, "input saved only for the weight gradients"


def _recompute_verdict(trace: PartitionTrace, root: str, compact_saved: bool) -> tuple[str, str]:
    """Below partitioner budget 1: read from the sampled partition alone (see the module docstring)."""
    needed = _needed_anyway(trace, root, compact_saved)
    if needed is not None:
        return needed
    if compact_saved:
        return FREES, "under recompute, the sampled partition keeps only the rows of this input"
    return FREES_NOTHING, "the sampled partition keeps neither this input nor its rows"
