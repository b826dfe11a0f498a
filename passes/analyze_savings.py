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

At budget 1 the two traces need nothing from each other: within a plan the sampled one runs in a
forked process beside the dense one (:mod:`wtacompile.analysis.forked`) and sends back what the
verdicts need as plain data (:class:`SampleFacts`), judged here against the dense trace. Read for
its structure only, it is traced lighter than it compiles: at the traced sizes, with norm-only
row scores and without the weight gradients' non-finite marker (none of them changes what forward
saves; about half the nodes).

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
from dataclasses import dataclass

import torch
import torch.fx as fx

from wtacompile._compat import dynamo_origin, is_storage_view, joint_parameter_inputs, size_hint, storage_root
from wtacompile.analysis.graph_cost import graph_cost, with_recompute_of
from wtacompile.analysis.forked import beside
from wtacompile.analysis.graph_numbers import Sizer, graph_memory, provenance_keys, saved_bytes, sketch, slopes_match
from wtacompile.analysis.partition_trace import (PartitionTrace, batch_symbols_of, copy_module, has_subgraph_calls,
                                                trace_joint, trace_largest_fitting, trace_partition, warm_up_tracing)
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
    candidates = [site for site in state.sites if site.skip_reason is None]
    verdicts = None
    if candidates and not under_recompute:
        # At budget 1 the sampled trace gives verdicts only, and those are structure: whether the
        # partition still keeps each input. It needs nothing from the dense trace, so it may run
        # beside it (a forked process, within a plan: wtacompile.analysis.forked). Verdicts are
        # structure, not sizes: traced at the traced sizes (half the cost of a symbolic trace),
        # each input sized from its twin in the dense trace.
        trial, rewritten = _sampled_graph(gm, candidates, config, under_recompute)
        verdicts = beside(lambda: _sample_facts(trace_partition(trial, config, static=True), rewritten),
                          "the sampled graph's verdict trace", lambda: warm_up_tracing(config.inner))
    try:
        dense, dense_sizer = _dense_trace(gm, config, under_recompute)
    except BaseException:
        if verdicts is not None:
            verdicts.cancel()
        raise
    parameters = joint_parameter_inputs(gm, dense.joint)
    fuses = config.inner == "inductor"
    memory = graph_memory(dense, parameters, dense_sizer, fuses)
    cost = graph_cost(dense)
    if not candidates:
        return dataclasses.replace(state, analysis=SavingsAnalysis((), (), memory, cost))
    if verdicts is not None:
        groups, _ = _group_by_input(dense, verdicts.result(), dense_sizer, under_recompute, partitions)
        return dataclasses.replace(state, analysis=SavingsAnalysis(groups, _untraced(candidates, groups), memory, cost))
    trial, rewritten = _sampled_graph(gm, candidates, config, under_recompute)
    # Under a budget the user set, the sampled graph may be compiled at a larger one: where its
    # partition still saves no more than the dense one at the user's budget, it recomputes less.
    # The headroom: the analysis sizes what the partition saves, not every detail of what Inductor
    # then allocates (measured before the headroom: a Llama raised to the exact bytes saved
    # 0.06% more than the budget alone).
    allowed = memory.activations.traced * RAISED_BYTES_HEADROOM

    def saves_no_more(split: PartitionTrace) -> bool:
        split_parameters = joint_parameter_inputs(trial, split.joint)
        return saved_bytes(split, split_parameters, Sizer(split.joint, split_parameters)).traced <= allowed

    # Not static under a partitioner budget below 1: its knapsack sizes every input, and a
    # symbolic scalar traced as its hint has none.
    sampled, raised_to = trace_largest_fitting(trial, config, raised_budgets(config), saves_no_more)
    raised_from = None
    if raised_to is not None:
        raised_from = effective_partitioner_budget(config)
        log.info("wtacrs: compiled at activation_memory_budget %g instead of %g: there the sampled "
                 "partition saves no more than the dense one at %g, and recomputes less",
                 raised_to, raised_from, raised_from)
        config = dataclasses.replace(config, activation_memory_budget=raised_to)
        state = dataclasses.replace(state, config=config)
    groups, compact = _group_by_input(dense, _sample_facts(sampled, rewritten), dense_sizer, under_recompute,
                                      partitions)
    untraced = _untraced(candidates, groups)
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


def _untraced(candidates, groups) -> tuple[str, ...]:
    """The candidates' weights that no input group holds (dead code: the trace dropped their linear)."""
    grouped = {w for group in groups for w in group.weights}
    return tuple(s.weight for s in candidates if s.weight not in grouped)


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
        # The second trace needs nothing from the first: it may run beside it (wtacompile.analysis.forked).
        later = beside(lambda: sketch(trace_joint(gm, config, dict.fromkeys(symbols, traced_batch + 1))),
                       f"the trace at batch {traced_batch + 1}", lambda: warm_up_tracing(config.inner))
        try:
            dense = trace_partition(gm, config, static=True)
        except BaseException:
            later.cancel()
            raise
        try:
            next_batch = later.result()
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


def _sampled_graph(gm: fx.GraphModule, candidates, config: WTAConfig, under_recompute: bool,
                   nonfinite_marker: bool | None = None) -> tuple[fx.GraphModule, Rewritten]:
    """A copy of ``gm`` with every candidate sampled at its requested ratio, one sample per input,
    the draw exposed in forward as the real compile exposes it."""
    trial = copy_module(gm)
    # At budget 1 the sampled trace gives verdicts only. Gradient-aware scores add the row cells
    # and the learned states (read by the draw in forward, written from dY in backward), none of
    # which touches x, so the trace is made with norm-only scores: about half the nodes (plans of
    # eight families identical either way); so is the non-finite marker, a backward read of dY
    # (a sixth of the rest; the facts are the same, tests/test_passes.py). Under recompute the
    # sampled partition's own bytes are the memory, so it is traced as it will be compiled.
    rewritten = rewrite_sites(trial, candidates, {s.weight: s.requested_ratio for s in candidates}, config,
                              fresh_states if under_recompute else None,
                              nonfinite_marker=under_recompute if nonfinite_marker is None else nonfinite_marker)
    expose_samples(trial)
    return trial, rewritten


@dataclass(frozen=True)
class SampleFacts:
    """What the sampled partition says about one sampled input: plain data, read where the
    sampled trace was made (perhaps a forked process) and judged against the dense trace."""

    weights: tuple[str, ...]  # the linears that share the sample
    root: str  # the sampled storage's name in the sampled joint graph
    root_key: tuple  # its provenance key (matches its twin in the dense trace)
    rows: tuple[tuple[str, int], ...]  # the sample's saved tensors: (name, dims): rows 2, indices 1
    needed: tuple[str, str] | None  # :func:`_needed_anyway`'s verdict, if the input is kept anyway
    input_saved: bool  # the whole input is saved (a partitioner then gathers rows in backward)
    # Saved tensors computed from the input that only the sampled partition might keep (a ReLU's
    # mask): (provenance key, saved bytes), and the input's own bytes to scale them by.
    derived: tuple[tuple[tuple, int], ...]
    root_bytes: int

    @property
    def compact_saved(self) -> bool:
        return any(dims == 2 for _, dims in self.rows)


def _sample_facts(sampled: PartitionTrace, rewritten: Rewritten) -> tuple[SampleFacts, ...]:
    """One :class:`SampleFacts` per sampled input of ``sampled`` (in graph order)."""
    samples = rewritten.samples
    keys = provenance_keys(sampled.joint, rewritten.renamed)
    saved = [sampled.joint_nodes[name] for name in sampled.saved_roots if name in sampled.joint_nodes]
    facts = []
    for node in sampled.joint.graph.find_nodes(op="call_function", target=torch.ops.wtacompile.sample_rows.default):
        origin = dynamo_origin(node)
        if origin not in samples:
            continue
        root = sampled_storage(node)
        rows = tuple((n.name, n.meta["val"].dim()) for n in saved
                     if dynamo_origin(n) == origin and n.meta["val"].dim() in (1, 2))
        compact_saved = any(dims == 2 for _, dims in rows)
        value = root.meta["val"]
        # Not the sampled linears' own values (their outputs, traced from the rewritten calls).
        derived = tuple((keys.get(n.name), size_hint(n.meta["val"].numel()) * _saved_itemsize(n))
                        for n in saved
                        if dynamo_origin(n) not in rewritten.renamed and dynamo_origin(n) != origin
                        and n is not root and any(storage_root(a) is root for a in n.all_input_nodes))
        facts.append(SampleFacts(
            tuple(s.weight for s in samples[origin]), root.name, keys.get(root.name), rows,
            _needed_anyway(sampled, root.name, compact_saved), root.name in sampled.saved_roots, derived,
            size_hint(value.numel()) * value.element_size()))
    return tuple(facts)


def _saved_itemsize(node: fx.Node) -> int:
    # Saved in another dtype than computed (a boolean mask kept as bf16 on CPU).
    return node.meta.get(SAVED_DTYPE, node.meta["val"].dtype).itemsize


def _group_by_input(dense: PartitionTrace, facts: tuple[SampleFacts, ...], sizer: Sizer, under_recompute: bool,
                    inner_partitions: bool) -> tuple[tuple[InputGroup, ...], list[list[tuple[str, Size]]]]:
    """The groups, and per group (in order) the saved compact-row nodes of the sampled trace with
    the sizes :class:`_AsIfExact` gives them. ``sizer`` sizes nodes of the dense trace."""
    dense_keys = provenance_keys(dense.joint, {})
    dense_saved = {dense_keys[name] for name in dense.saved_roots if name in dense_keys}
    dense_by_key = {key: dense.joint_nodes[name] for name, key in dense_keys.items()}
    groups, compact = [], []
    for fact in facts:
        twin = dense_by_key.get(fact.root_key)
        if twin is None:
            raise RuntimeError(f"wtacrs analysis: sampled input {fact.root} has no twin in the dense trace")
        if fact.needed is not None:
            verdict, reason = fact.needed
        elif under_recompute:
            verdict, reason = _recompute_verdict(fact.compact_saved)
        else:
            verdict, reason = _verdict(fact.root_key in dense_saved, fact.compact_saved)
        root_size = sizer(twin)
        zero = root_size * 0
        compact.append([(name, root_size if dims == 2 else zero) for name, dims in fact.rows])
        # Only a partitioner gathers rows in backward (the eager inner compiler saves the copy).
        input_saved = fact.input_saved and inner_partitions
        # Under recompute the sampled partition's own bytes are the memory: nothing to add.
        kept = None if under_recompute or verdict != FREES else _kept_instead(fact, dense_saved, root_size)
        groups.append(InputGroup(fact.root, fact.weights, root_size, verdict, reason, input_saved, kept))
    return tuple(groups), compact


def _kept_instead(fact: SampleFacts, dense_saved: set[tuple], root_size: Size) -> Size | None:
    """What the sampled partition saves, and the dense one does not, computed from the sampled
    input (not the sample's own rows): a ReLU's ``out <= 0`` once the output itself is not saved.
    Sized from the input's dense size by saved bytes (affine in the batch like it)."""
    kept = None
    for key, share in fact.derived:
        if key in dense_saved:
            continue
        size = Size(root_size.traced * share // fact.root_bytes,
                    None if root_size.per_batch is None else root_size.per_batch * share // fact.root_bytes)
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


def _verdict(dense_saves_it: bool, compact_saved: bool) -> tuple[str, str]:
    """At budget 1, where the sampled trace keeps the input neither saved nor recomputed."""
    if not dense_saves_it:
        if compact_saved:
            return ADDS_MEMORY, "dense training recomputes this input; the rows would add"
        return FREES_NOTHING, "dense training does not save this input either (recomputes it)"
    return FREES, "input saved only for the weight gradients"


def _recompute_verdict(compact_saved: bool) -> tuple[str, str]:
    """Below partitioner budget 1: read from the sampled partition alone (see the module docstring)."""
    if compact_saved:
        return FREES, "under recompute, the sampled partition keeps only the rows of this input"
    return FREES_NOTHING, "the sampled partition keeps neither this input nor its rows"
