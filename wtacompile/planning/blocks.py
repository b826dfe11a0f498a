r"""Plan a deep model from a few traced blocks of each kind.

Why: a transformer stack repeats one block ``L`` times, and tracing costs the same for every
copy (dynamo and two AOTAutograd traces on fake tensors: one to two seconds per block on two CPU
cores, minutes for an 80-layer model) while the copies teach nothing the first ones did not. So
the planner traces three blocks of each run of identical blocks and composes the model's numbers.

**Runs.** The children of an ``nn.ModuleList`` (not nested in another run's block) are grouped
into maximal runs of consecutive children with the same signature: class, and the name, shape,
dtype and ``requires_grad`` of every parameter and buffer. T5's first block (it owns the
relative-position bias) is a run of one; the other ``L − 1`` are one run. For the trace the list
keeps three children of each run: the first, the second (standing for all but the last) and the
last; the first and last are traced as runs of their own (the first may make what the others
share, the last's output may be read in part). It is restored afterwards.

**Composition** (per captured graph). Every saved tensor and every backward allocation is
credited to the module it was traced in (a tangent, or a gradient sum outside any module, to the
module that reads it). For the run ``r`` of ``n`` copies the traced block stands for:

* saved activations: ``A + (n − 1)·a_r``, ``a_r`` the saved bytes the block made;
* backward live bytes at a point ``p`` of the traced curve, with ``o_r(p)`` the bytes the block
  owns alive at ``p``, ``h_r`` those alive just before its first gradient computation (saved
  tensors, its tangents, recomputations hoisted to the start) and ``g_r`` the weight gradients it
  returns: before the block's backward every copy is in the block's state, ``+ (n − 1)·o_r(p)``.
  While it runs, the copy ``j`` places from the last runs with ``n − 1 − j`` copies not reached
  and ``j`` done: ``+ (n − 1 − j)·h_r + j·g_r``, linear in ``j``, so the worst copy is an end:
  ``+ (n − 1)·max(h_r, g_r)`` (both kept as points: which is larger depends on the batch).
  After it: ``+ (n − 1)·g_r``;
* work (the step-time model's FLOPs and bytes): the block's own, ``n − 1`` more times;
* sites, input groups and weights of the traced block are repeated under each copy's name
  (``model.layers.1.mlp.up_proj.weight`` → ``model.layers.{i}.mlp.up_proj.weight``); an input
  read from several blocks (T5's encoder output) stays one group with each copy's readers.

This assumes what makes blocks repeat: the partitioner treats each copy alike, and blocks talk
only through the residual stream. The tests hold it to the full trace on 4- and 5-layer models of each
family and under PEFT (identical plans); where a block's tensors are spread over several graphs
(graph breaks inside the stack), :class:`NotComposable` sends the planner back to a full trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from wtacompile.memory_model import GraphMemory, Size
from wtacompile.passes import CompileState
from wtacompile.sites import InputGroup
from wtacompile.time_model import GraphCost

__all__ = ["BlockRun", "NotComposable", "compose_states", "find_repeated_blocks", "one_block_per_run"]


class NotComposable(ValueError):
    """The traced graphs cannot be composed into the full model's (the planner traces it all)."""


@dataclass(frozen=True)
class BlockRun:
    """``len(indices)`` identical consecutive children of the ``nn.ModuleList`` at ``container``."""

    container: str  # dotted module path of the list ("model.layers")
    indices: tuple[int, ...]  # the children's indices in the full list
    traced_index: int  # the index of the one traced child in the truncated list

    @property
    def copies(self) -> int:
        return len(self.indices)

    @property
    def traced_prefix(self) -> str:
        return _child(self.container, self.traced_index)

    def owns(self, path: str) -> bool:
        """Whether a module path or parameter name lies in the traced block."""
        return path == self.traced_prefix or path.startswith(self.traced_prefix + ".")

    def renamed(self, name: str, index: int) -> str:
        """``name`` (in the traced block) as the name of the same thing in child ``index``."""
        return _child(self.container, index) + name[len(self.traced_prefix):]


def _child(container: str, index: int) -> str:
    return f"{container}.{index}" if container else str(index)


def find_repeated_blocks(model: torch.nn.Module) -> tuple[BlockRun, ...]:
    """Every run of identical consecutive blocks (see the module docstring); runs of one
    included, so that the truncated list keeps every child that is traced."""
    runs: list[BlockRun] = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if any(path.startswith(r.container + ".") for r in runs):
            continue  # a list inside a block (MoE experts) is traced with its block
        signatures = [_signature(child) for child in module]
        if not any(tensors for _, tensors in signatures):
            continue
        found: list[BlockRun] = []
        for _, group in itertools.groupby(range(len(module)), key=signatures.__getitem__):
            indices = tuple(group)
            # The first and the last of a run are traced on their own: the first may make what
            # the others share (BERT's extended attention mask is made in layer 0 and reused), and
            # the last's output may be read in part only (a classifier reads one token of it).
            parts = (indices[:1], indices[1:-1], indices[-1:]) if len(indices) > 2 else [(i,) for i in indices]
            for part in parts:
                found.append(BlockRun(path, part, traced_index=len(found)))
        if any(r.copies > 1 for r in found):
            runs.extend(found)
    return tuple(runs)


def _signature(module: torch.nn.Module) -> tuple:
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    return (type(module).__qualname__,
            tuple((n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in tensors))


@contextlib.contextmanager
def one_block_per_run(model: torch.nn.Module, runs: Sequence[BlockRun]) -> Iterator[None]:
    """For the duration, each list of ``runs`` holds the first child of each of its runs only
    (re-numbered from 0: ``BlockRun.traced_index``)."""
    lists = {r.container: model.get_submodule(r.container) for r in runs}
    originals = {path: lst._modules for path, lst in lists.items()}
    try:
        for path, lst in lists.items():
            kept = [r.indices[0] for r in runs if r.container == path]
            lst._modules = OrderedDict((str(i), originals[path][str(k)]) for i, k in enumerate(kept))
        yield
    finally:
        for path, lst in lists.items():
            lst._modules = originals[path]


def compose_states(states: Sequence[CompileState], runs: Sequence[BlockRun]) -> list[CompileState]:
    """The full model's analysed graphs, from those traced with :func:`one_block_per_run`."""
    # Runs of one need renaming too where the list was shortened before them (the last block).
    moved = [r for r in runs if r.copies > 1 or r.indices[0] != r.traced_index]
    homes = {r: [g for g, s in enumerate(states) if _touches(s, r)] for r in moved}
    for r, graphs in homes.items():
        if r.copies > 1 and len(graphs) != 1:
            raise NotComposable(f"the block {r.traced_prefix} spans {len(graphs)} captured graphs")
    return [_compose_state(s, [r for r in moved if g in homes[r]]) for g, s in enumerate(states)]


def _touches(state: CompileState, run: BlockRun) -> bool:
    memory = state.analysis.memory
    return (any(run.owns(s.weight) for s in state.sites)
            or any(run.owns(o) for o, _ in memory.saved_owners)
            or any(run.owns(a.owner) for a in memory.allocations))


def _compose_state(state: CompileState, runs: list[BlockRun]) -> CompileState:
    if not runs:
        return state
    analysis = state.analysis

    def run_of(name: str) -> BlockRun | None:
        return next((r for r in runs if r.owns(name)), None)

    sites = _repeat(state.sites, lambda s: run_of(s.weight),
                    lambda s, r, i: dataclasses.replace(s, weight=r.renamed(s.weight, i)))
    def group_run(group: InputGroup) -> BlockRun | None:
        runs_read = {run_of(w) for w in group.weights}
        return runs_read.pop() if len(runs_read) == 1 else None

    # A group inside one block repeats with it; one input read from several blocks (T5's encoder
    # output, read by every decoder block's cross-attention) stays one group with more readers.
    groups = [g if group_run(g) is not None else dataclasses.replace(
                  g, weights=tuple(_repeat(g.weights, run_of, lambda w, r, i: r.renamed(w, i))))
              for g in analysis.groups]
    groups = _repeat(groups, group_run, _renamed_group)
    untraced = _repeat(analysis.untraced, run_of, lambda w, r, i: r.renamed(w, i))
    memory = _compose_memory(analysis.memory, runs)
    return dataclasses.replace(state, sites=tuple(sites), analysis=dataclasses.replace(
        analysis, groups=tuple(groups), untraced=tuple(untraced), memory=memory,
        cost=_compose_cost(analysis.cost, runs)))


def _compose_cost(cost: GraphCost, runs: list[BlockRun]) -> GraphCost:
    """The work of the traced block, ``n − 1`` more times per run."""
    flops, nbytes = cost.flops, cost.bytes
    for r in (r for r in runs if r.copies > 1):
        flops += (r.copies - 1) * sum(f for o, f, _ in cost.owners if r.owns(o))
        nbytes += (r.copies - 1) * sum(b for o, _, b in cost.owners if r.owns(o))
    return GraphCost(flops, nbytes)


def _renamed_group(group: InputGroup, run: BlockRun, index: int) -> InputGroup:
    return dataclasses.replace(group, root=f"{group.root}@{_child(run.container, index)}",
                               weights=tuple(run.renamed(w, index) for w in group.weights))


def _repeat(items: Iterable, run_of: Callable, rename: Callable) -> list:
    """``items`` in order, each stretch that belongs to a run repeated once per copy, renamed."""
    out = []
    for run, stretch in itertools.groupby(items, key=run_of):
        stretch = list(stretch)
        if run is None:
            out.extend(stretch)
        else:
            out.extend(rename(item, run, i) for i in run.indices for item in stretch)
    return out


def _compose_memory(memory: GraphMemory, runs: list[BlockRun]) -> GraphMemory:
    if len(memory.allocations) != len(memory.backward_live):
        raise NotComposable("the graph's backward allocations carry no module paths")
    zero = memory.activations * 0
    activations, offsets = memory.activations, []
    for r in (r for r in runs if r.copies > 1):
        activations = activations + sum((s for o, s in memory.saved_owners if r.owns(o)), zero) * (r.copies - 1)
        offsets.append(_copy_offsets(memory, r, zero))
    curve: list[Size] = []
    for p, point in enumerate(memory.backward_live):
        options = [point]
        for per_point in offsets:
            options = [o + extra for o in options for extra in per_point[p]]
        curve.extend(options)
    return GraphMemory(activations, tuple(curve))


def _copy_offsets(memory: GraphMemory, run: BlockRun, zero: Size) -> list[tuple[Size, ...]]:
    """What the other ``n − 1`` copies add at each point of the traced curve (one or two
    candidates: the worst copy is either end of the run, see the module docstring)."""
    owned = [p for p, a in enumerate(memory.allocations) if run.owns(a.owner)]
    steps = [p for p in owned if memory.allocations[p].gradient_step]
    if not steps:
        raise NotComposable(f"no gradient computation of {run.traced_prefix} was found")
    start, end = steps[0], steps[-1]
    change = [zero] * (len(memory.backward_live) + 1)
    gradients = zero
    for p in owned:
        allocation = memory.allocations[p]
        change[p] = change[p] + allocation.size
        if allocation.last_point is None:
            gradients = gradients + allocation.size
        else:
            change[allocation.last_point + 1] = change[allocation.last_point + 1] - allocation.size
    owned_live, live = [], zero
    for p in range(len(memory.backward_live)):
        live = live + change[p]
        owned_live.append(live)
    extra = run.copies - 1
    waiting = owned_live[start - 1] if start else zero  # what a copy not yet reached holds
    return [(owned_live[p] * extra,) if p < start
            else (waiting * extra, gradients * extra) if p <= end
            else (gradients * extra,)
            for p in range(len(memory.backward_live))]
