"""Decide which linears to sample: only those whose full input sampling actually releases.

Why: sampling a linear saves its *weight-gradient* copy of ``x`` only. The memory comes back only
if nothing else keeps ``x`` for backward — and often something does: q/k/v share one input, an
activation's backward may need the very tensor the next linear reads, and the partitioner may save
a tensor or recompute it from another one it keeps anyway. Those facts live in the AOTAutograd
joint graph and the partitioner's choice of saved tensors, not in the model code.

How: trace the graph through AOTAutograd twice, with the same decompositions and min-cut
partitioner the inner compiler uses: once as it is (dense) and once with every eligible site
(trainable weight, allowed by include/exclude, ratio < 1) rewritten to the sampled op. For each
site with input ``x``, resolved through views to its storage root ``R``:

* ``R`` is still saved, or recomputed in backward, in the sampled trace → another backward needs
  the full input: ``adds-memory`` (sampling would only add the compact copy); left dense.
* ``R`` is not saved by the dense trace either (the partitioner recomputes it from something it
  keeps anyway, e.g. a GELU output from its input) → ``frees-nothing``; left dense.
* otherwise → ``frees``: sampling releases ``bytes(R)`` minus the compact rows of every site
  reading it. Sites sharing one root (q/k/v) are decided together, and a group whose compact
  copies would outweigh the root (three siblings at ratio 0.5) is ``adds-memory``.

The two traces name their nodes differently, so tensors are matched by provenance: the dynamo
node they came from plus numel, dtype and ordinal
(:func:`wtacompile.analysis.graph_numbers.provenance_keys`).

Returns the state with ``analysis``: the groups with their verdicts and sizes, and the dense
partition's numbers for the memory model. Neither ``gm`` nor the sites change; weighing the
compact copies against the input at the chosen ratio is the policy's job
(:mod:`wtacompile.passes.choose_ratios`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
import torch.fx as fx

from wtacompile._compat import dynamo_origin, joint_parameter_inputs, storage_root
from wtacompile.analysis.graph_numbers import Sizer, graph_memory, provenance_keys
from wtacompile.analysis.partition_trace import PartitionTrace, copy_module, trace_partition
from wtacompile.sites import ADDS_MEMORY, FREES, FREES_NOTHING, InputGroup, LinearSite, SavingsAnalysis
from .compile_state import CompileState
from .rewrite_sampled import rewrite_sites

__all__ = ["analyze_savings"]


def analyze_savings(gm: fx.GraphModule, state: CompileState) -> CompileState:
    """Trace dense and all-candidates-sampled; group the candidates by input, with verdicts."""
    config = state.config
    dense = trace_partition(gm, config)
    parameters = joint_parameter_inputs(gm, dense.joint)
    memory = graph_memory(dense, parameters, Sizer(dense.joint, parameters))
    candidates = [site for site in state.sites if site.skip_reason is None]
    if not candidates:
        return dataclasses.replace(state, analysis=SavingsAnalysis((), (), memory))

    trial = copy_module(gm)
    replaced = rewrite_sites(trial, candidates, {s.weight: s.requested_ratio for s in candidates}, config)
    sampled = trace_partition(trial, config)
    groups = _group_by_input(dense, sampled, replaced, Sizer(sampled.joint, parameters))
    grouped = {w for group in groups for w in group.weights}
    untraced = tuple(s.weight for s in candidates if s.weight not in grouped)
    return dataclasses.replace(state, analysis=SavingsAnalysis(groups, untraced, memory))


def _group_by_input(dense: PartitionTrace, sampled: PartitionTrace, replaced: dict[str, LinearSite],
                    sizer: Sizer) -> tuple[InputGroup, ...]:
    renamed = {name: site.node for name, site in replaced.items()}
    dense_keys = provenance_keys(dense.joint, {})
    dense_saved = {dense_keys[name] for name in dense.saved_roots if name in dense_keys}
    keys = provenance_keys(sampled.joint, renamed)

    readers: dict[str, list[str]] = defaultdict(list)
    roots: dict[str, fx.Node] = {}
    target = torch.ops.wtacompile.sampled_linear.default
    for node in sampled.joint.graph.find_nodes(op="call_function", target=target):
        site = replaced.get(dynamo_origin(node))
        if site is None:
            continue
        root = storage_root(node.args[0])
        readers[root.name].append(site.weight)
        roots[root.name] = root
    return tuple(
        InputGroup(name, tuple(weights), sizer(roots[name]),
                   *_verdict(sampled, name, keys.get(name) in dense_saved))
        for name, weights in readers.items()
    )


def _verdict(trace: PartitionTrace, root: str, dense_saves_it: bool) -> tuple[str, str]:
    if root in trace.saved_roots:
        return ADDS_MEMORY, "full input stays saved for another op's backward"
    if root in trace.recomputed:
        return ADDS_MEMORY, "full input is recomputed for another op's backward"
    if not dense_saves_it:
        return FREES_NOTHING, "dense training does not save this input either (recomputes it)"
    return FREES, "input saved only for this weight gradient"
