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
node they came from (``from_node``) plus numel, dtype and ordinal.

Only decisions change here (``LinearSite.sampled``/``verdict``/``reason``/``freed_bytes``); the
graph itself is rewritten by :mod:`wtacompile.passes.rewrite_sampled`.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._functorch.partitioners import get_default_op_list

from wtacompile.config import WTAConfig
from wtacompile.estimator import num_kept_rows
from wtacompile.report import ADDS_MEMORY, FREES, FREES_NOTHING, SKIPPED, LinearSite
from .find_linears import META_KEY, size_hint as _hint
from .pin_sampled_choices import pinned_min_cut_partition
from .rewrite_sampled import rewrite_sampled

__all__ = [
    "GraphAnalysis",
    "PartitionTrace",
    "SiteGroup",
    "analyze_savings",
    "apply_verdicts",
    "classify_sites",
    "compact_bytes",
    "trace_partition",
]



@dataclass
class PartitionTrace:
    """The joint graph and the partitioner's split of it."""

    joint: fx.GraphModule
    forward: fx.GraphModule
    backward: fx.GraphModule
    num_fwd_outputs: int

    @functools.cached_property
    def saved_roots(self) -> set[str]:
        """Joint-graph names of the storages the forward saves for backward."""
        out = self.forward.graph.find_nodes(op="output")[0]
        saved = out.args[0][self.num_fwd_outputs:]
        return {_root(n).name for n in saved if isinstance(n, fx.Node) and _is_tensor(n)}

    @functools.cached_property
    def recomputed(self) -> set[str]:
        """Forward nodes the backward graph recomputes (copied under their joint names)."""
        return {n.name for n in self.backward.graph.nodes if n.op == "call_function"}

    def saved_bytes(self, exclude: set[str] = frozenset(), size=None) -> int:
        """Bytes of the distinct storages saved for backward, less the ``exclude`` d ones.

        ``size`` gives a node's bytes (e.g. at another batch size); default: as traced.
        """
        size = size or _nbytes
        nodes = {n.name: n for n in self.joint.graph.nodes}
        return sum(size(nodes[n]) for n in self.saved_roots if n in nodes and n not in exclude)

    def backward_peak_bytes(self, exclude: set[str] = frozenset(), size=None) -> int:
        """Peak live bytes while the backward graph runs: saved inputs and intermediates are freed
        after their last use (AOTAutograd's boxed calling convention clears its argument list),
        the gradients it returns stay. Parameters (``exclude``) are not counted."""
        nodes = [n for n in self.backward.graph.nodes if n.op != "output"]
        position = {n: i for i, n in enumerate(nodes)}
        # A saved view of a parameter (a transposed weight) arrives as its own placeholder.
        forward_nodes = {n.name: n for n in self.forward.graph.nodes}
        exclude = set(exclude) | {
            n.name for n in nodes if n.op == "placeholder" and n.name in forward_nodes
            and _root(forward_nodes[n.name]).name in exclude
        }
        returned = {_root(n) for n in self.backward.graph.find_nodes(op="output")[0].all_input_nodes}
        # Storages only (views own nothing); an unused one dies at once.
        dies_after: dict[fx.Node, int] = {n: position[n] for n in nodes if _root(n) is n}
        for node in nodes:
            for arg in node.all_input_nodes:
                base = _root(arg)
                dies_after[base] = max(dies_after[base], position[node])
        releases: dict[int, list[fx.Node]] = defaultdict(list)
        for base, when in dies_after.items():
            if base not in returned:
                releases[when].append(base)
        size = size or _nbytes
        live = peak = 0
        for i, node in enumerate(nodes):
            if _root(node) is node and _is_tensor(node) and node.name not in exclude:
                live += size(node)
                peak = max(peak, live)
            for base in releases[i]:
                if _is_tensor(base) and base.name not in exclude:
                    live -= size(base)
        return peak


def trace_partition(gm: fx.GraphModule, config: WTAConfig) -> PartitionTrace:
    """Trace ``gm`` through AOTAutograd the way the inner compiler will, returning the split."""
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.aot_autograd import aot_module_simplified

    captured: dict = {}
    def recording_partition(joint, joint_inputs, **kwargs):
        forward, backward = pinned_min_cut_partition(joint, joint_inputs, **kwargs)
        captured["trace"] = PartitionTrace(joint, forward, backward, kwargs["num_fwd_outputs"])
        return forward, backward

    decompositions = None
    if config.inner == "inductor":
        from torch._inductor.decomposition import select_decomp_table

        decompositions = select_decomp_table()
    example_inputs = [n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder")]
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    # A fresh tracing context: this trace must leave nothing behind for the real compile.
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
        aot_module_simplified(
            gm, example_inputs, fw_compiler=boxed_nop, bw_compiler=boxed_nop,
            partition_fn=recording_partition, decompositions=decompositions,
        )
    if "trace" not in captured:
        raise RuntimeError("wtacrs analysis: AOTAutograd produced no joint graph to partition")
    return captured["trace"]


@dataclass
class SiteGroup:
    """Sampled-candidate linears that read one saved input (q/k/v share one), and its fate."""

    root: str  # joint-graph name of the input's storage
    root_bytes: int
    sites: list[LinearSite]
    verdict: str  # FREES, FREES_NOTHING or ADDS_MEMORY, before weighing the compact copies
    reason: str
    root_node: fx.Node | None = None  # in the all-sampled trace, to size it at other shapes


@dataclass
class GraphAnalysis:
    """What the graph adapter learnt from one captured graph: the groups and the dense split."""

    groups: list[SiteGroup]
    dense: PartitionTrace
    parameter_inputs: set[str]  # joint placeholders that are parameters or buffers
    _sizes: dict = dataclasses.field(default_factory=dict, repr=False)  # node -> (bytes, per row)

    @property
    def activation_bytes(self) -> int:
        """Bytes the dense partition saves for backward, parameters excluded."""
        return self.dense.saved_bytes(exclude=self.parameter_inputs)

    def batch_symbol(self):
        """(symbol, traced value) of the batch dimension if the graph was traced with a dynamic
        one, else ``None``."""
        for node in self.dense.joint.graph.find_nodes(op="placeholder"):
            value = node.meta.get("val")
            if node.name in self.parameter_inputs or not isinstance(value, torch.Tensor):
                continue
            if value.dim() and isinstance(value.shape[0], torch.SymInt):
                free = value.shape[0].node.expr.free_symbols
                if len(free) == 1:
                    symbol = next(iter(free))
                    return symbol, int(_backed_values(value.shape[0].node.shape_env)[symbol])
        return None

    def sizer(self, batch: int | None):
        """A function giving a node's bytes at ``batch`` (``None``: as traced).

        Needs a symbolic batch. A tensor's numel is linear in the batch (one dimension carries
        it), so each node is evaluated symbolically once, at two points, and cached.
        """
        if batch is None:
            return _nbytes
        found = self.batch_symbol()
        if found is None:
            raise ValueError("this graph was traced with a static batch size")
        symbol, traced = found

        def size(node: fx.Node) -> int:
            if node not in self._sizes:
                here = _nbytes(node)
                self._sizes[node] = (here, _nbytes(node, {symbol: traced + 1}) - here)
            here, per_row = self._sizes[node]
            return here + per_row * (batch - traced)

        return size

    def sizes_at(self, batch: int | None) -> tuple[int, int, dict[str, int]]:
        """(saved activation bytes, backward peak bytes, bytes per group root) at ``batch``."""
        size = self.sizer(batch)
        return (
            self.dense.saved_bytes(exclude=self.parameter_inputs, size=size),
            self.dense.backward_peak_bytes(exclude=self.parameter_inputs, size=size),
            {g.root: size(g.root_node) for g in self.groups},
        )


def analyze_savings(gm: fx.GraphModule, config: WTAConfig) -> fx.GraphModule:
    """Set ``sampled``/``verdict``/``reason``/``freed_bytes`` on every :class:`LinearSite`."""
    if not _eligible_sites(gm):
        return gm
    apply_verdicts(classify_sites(gm, config), config.min_rows)
    return gm


def apply_verdicts(analysis: GraphAnalysis, min_rows: int) -> None:
    """Decide each site from its group's verdict and its ``keep_ratio`` (1.0: leave it exact)."""
    for group in analysis.groups:
        verdict, reason = group.verdict, group.reason
        if all(s.keep_ratio >= 1.0 for s in group.sites):
            for site in group.sites:
                site.sampled, site.verdict, site.freed_bytes = False, SKIPPED, 0
                site.reason = "exact: the memory budget is met without sampling it"
            continue
        compact = sum(_compact_bytes(s, s.keep_ratio, min_rows) for s in group.sites)
        freed = group.root_bytes - compact
        if verdict == FREES and freed <= 0:
            verdict = ADDS_MEMORY
            reason = f"{len(group.sites)} compact copies outweigh the input they replace"
        shared = f" (input shared by {len(group.sites)} linears)" if len(group.sites) > 1 else ""
        for site in group.sites:
            site.verdict = verdict
            site.sampled = verdict == FREES
            site.reason = reason + shared
            site.freed_bytes = freed // len(group.sites) if site.sampled else 0


def _eligible_sites(gm: fx.GraphModule) -> list[LinearSite]:
    eligible = []
    for site in (n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta):
        site.sampled, site.verdict = False, SKIPPED
        if not site.weight_requires_grad:
            site.reason = "frozen weight: no activation saved for it"
        elif site.keep_ratio is None:
            site.reason = "excluded by include/exclude"
        elif site.keep_ratio >= 1.0:
            site.reason = "keep ratio 1.0: exact"
        else:
            eligible.append(site)
    return eligible


def classify_sites(gm: fx.GraphModule, config: WTAConfig) -> GraphAnalysis:
    """Trace dense and all-sampled; group the eligible sites by input and give each a verdict.

    This is the graph adapter shared by the backend and the planner: the verdicts do not depend
    on the keep ratio (bar the compact-copy check the caller applies).
    """
    eligible = _eligible_sites(gm)
    dense = trace_partition(_copy_module(gm), config)
    parameters = _parameter_inputs(gm, dense.joint)
    if not eligible:
        return GraphAnalysis([], dense, parameters)
    for site in eligible:
        site.sampled = True
    trial = _copy_module(gm)
    rewrite_sampled(trial, config)
    sampled = trace_partition(trial, config)
    for site in eligible:
        site.sampled = False
    # The rewrite gave the sampled nodes new names; the joint graph's provenance uses those.
    renamed = {n.name: n.meta[META_KEY].node for n in trial.graph.nodes if META_KEY in n.meta}
    dense_keys = _provenance_keys(dense.joint, {})
    dense_saved_keys = {dense_keys[name] for name in dense.saved_roots if name in dense_keys}

    by_node = {site.node: site for site in eligible}
    keys = _provenance_keys(sampled.joint, renamed)
    members: dict[str, list[LinearSite]] = defaultdict(list)
    roots: dict[str, fx.Node] = {}
    for node in sampled.joint.graph.find_nodes(op="call_function", target=_sampled_op()):
        site = by_node.get(renamed.get(_dynamo_source(node), ""))
        if site is None:
            continue
        root = _root(node.args[0])
        site.input_root = root.name
        members[root.name].append(site)
        roots[root.name] = root
    groups = []
    for name, sites in members.items():
        verdict, reason = _verdict(sampled, roots[name], keys, dense_saved_keys)
        groups.append(SiteGroup(name, _nbytes(roots[name]), sites, verdict, reason, roots[name]))
    for site in eligible:
        if site.input_root is None:  # vanished from the trace (dead code): nothing to gain
            site.verdict, site.reason = FREES_NOTHING, "not in the traced graph"
    return GraphAnalysis(groups, dense, parameters)


def _verdict(
    trace: PartitionTrace, root: fx.Node, keys: dict[str, tuple], dense_saved_keys: set[tuple]
) -> tuple[str, str]:
    if root.name in trace.saved_roots:
        return ADDS_MEMORY, "full input stays saved for another op's backward"
    if root.name in trace.recomputed:
        return ADDS_MEMORY, "full input is recomputed for another op's backward"
    if keys.get(root.name) not in dense_saved_keys:
        return FREES_NOTHING, "dense training does not save this input either (recomputes it)"
    return FREES, "input saved only for this weight gradient"


def _provenance_keys(joint: fx.GraphModule, renamed: dict[str, str]) -> dict[str, tuple]:
    """A name-independent key per joint-graph tensor, equal across two traces of one dynamo graph.

    Joint-graph names depend on how many aten ops came before, which differs once some linears
    are rewritten; the dynamo node a tensor came from (``from_node``) does not. Among tensors from
    one dynamo node, (numel, dtype, ordinal) tells them apart (a layer norm's output vs its
    statistics; a linear's output, whichever aten ops produced it).
    """
    keys: dict[str, tuple] = {}
    seen: dict[tuple, int] = defaultdict(int)
    for node in joint.graph.nodes:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or _is_view(node):
            continue
        source = node.name if node.op == "placeholder" else _dynamo_source(node)
        source = renamed.get(source, source)
        base = (source, _hint(value.numel()), value.dtype)
        keys[node.name] = (*base, seen[base])
        seen[base] += 1
    return keys


@functools.cache
def _op_types():
    return get_default_op_list()


def _is_view(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if target is operator.getitem:  # one output of split/unbind/chunk: a view of their input
        return _is_view(node.args[0])
    if target is torch.ops.aten._unsafe_view.default:  # aliases its input without view tracking
        return True
    return bool(getattr(target, "is_view", False)) or _op_types().is_view(node)


def _root(node: fx.Node) -> fx.Node:
    """The node owning the storage that ``node`` views."""
    while _is_view(node):
        node = node.args[0]
    return node


def _dynamo_source(node: fx.Node) -> str | None:
    chain = node.meta.get("from_node")
    return chain[0].name if chain else None


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new_graph = fx.Graph()
    output = new_graph.graph_copy(graph, {})
    new_graph.output(output)
    return new_graph


def _copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite freely, keeping the module meta AOTAutograd reads (which inputs are
    parameters: the partitioner treats those as free to save)."""
    copy = fx.GraphModule(gm, _copy_graph(gm.graph))
    copy.meta.update(gm.meta)
    return copy


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _backed_values(shape_env) -> dict:
    """Traced values of the shape symbols (``var_to_val`` before torch 2.13)."""
    values = getattr(shape_env, "backed_var_to_val", None)
    return values if values is not None else shape_env.var_to_val


def _nbytes(node: fx.Node, at: dict | None = None) -> int:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return 0
    numel = value.numel()
    if at is not None and isinstance(numel, torch.SymInt):
        expr = numel.node.expr.subs(at)
        if expr.free_symbols:  # other symbols keep their traced values
            hints = _backed_values(numel.node.shape_env)
            expr = expr.subs({sym: hints[sym] for sym in expr.free_symbols if sym in hints})
        return int(expr) * value.element_size()
    return _hint(numel) * value.element_size()


def _compact_bytes(site: LinearSite, keep_ratio: float, min_rows: int, rows: int | None = None) -> int:
    """Bytes the sampled op saves for one site: k pre-scaled rows plus k int64 indices."""
    itemsize = torch.empty((), dtype=getattr(torch, site.dtype)).element_size()
    k = num_kept_rows(site.rows if rows is None else rows, keep_ratio, min_rows)
    return k * site.in_features * itemsize + k * 8


compact_bytes = _compact_bytes


def _sampled_op():
    return torch.ops.wtacompile.sampled_linear.default


def _parameter_inputs(gm: fx.GraphModule, joint: fx.GraphModule) -> set[str]:
    """Joint-graph placeholder names that are parameters or buffers (not activations)."""
    dynamo_placeholders = gm.graph.find_nodes(op="placeholder")
    primals = [n for n in joint.graph.find_nodes(op="placeholder") if n.name.startswith("primals")]
    names = set()
    for dyn, primal in zip(dynamo_placeholders, primals):
        grapharg = dyn.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None else ""
        source = source() if callable(source) else source
        if "_parameters[" in source or "_buffers[" in source:
            names.add(primal.name)
    return names

