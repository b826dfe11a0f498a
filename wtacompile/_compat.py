"""Every dynamo / AOTAutograd / ShapeEnv internal that wtacompile relies on, in one place.

A torch upgrade that renames one of these breaks this file and ``tests/test_compat.py``, nothing
else. Each function documents the internal it reads and what it assumes of it.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "aot_trace",
    "backed_values",
    "compile_isolated",
    "dynamo_origin",
    "evaluate_at",
    "fake_twin",
    "graph_root_module",
    "is_storage_view",
    "joint_parameter_inputs",
    "only_symbol",
    "batch_symbols",
    "parameter_names",
    "parameter_placeholders",
    "placeholder_example",
    "placeholder_source",
    "primal_placeholders",
    "scalar_hint",
    "size_hint",
    "source_parameter_name",
    "specialize_scalar_inputs",
    "storage_root",
    "unwrap_compiled",
]

# The root object of a source: ``L['self']``, or ``L['args'][0]`` where the model's forward is wrapped by a ``*args`` decorator
# (Hugging Face's output-capturing wrappers in transformers 5).
_ROOT = re.compile(r"^(?:L\['args'\]\[\d+\]|[LG]\['[^']*'\])")
_ITEM = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\[(\d+)\]|\[\'([^']*)\'\]")


# --------------------------------------------------------------------------- dynamo graphs


def placeholder_source(node: fx.Node) -> str | None:
    """The source expression dynamo recorded for a placeholder, e.g.
    ``L['self']._modules['h']._modules['0']._parameters['weight']``.

    Reads ``node.meta["grapharg"].source.name`` (a property in older torch, a method in newer).
    """
    if node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    if grapharg is None or grapharg.source is None:
        return None
    name = grapharg.source.name
    return name() if callable(name) else name


def compile_isolated(model, backend):
    """``torch.compile(model, backend=backend)`` whose cache entries live in a region of their own
    (``isolate_recompiles``, recent torch), so they neither count against nor touch the recompile
    limits of the user's compiled functions. Older torch: a plain compile — dynamo's backend-match
    check still keeps the entries apart, but they share the per-code recompile limit."""
    import inspect

    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        return torch.compile(model, backend=backend, dynamic=None, isolate_recompiles=True)
    return torch.compile(model, backend=backend, dynamic=None)


@contextlib.contextmanager
def without_dynamo_debug_text() -> Iterator[None]:
    """Within: dynamo skips two pieces of debug text it builds even with its logs off, for a
    capture of our own (``plan()``'s), which nobody debugs through torch's logs.

    Measured on a 7B-shaped Llama's three blocks under PEFT, first capture in a process: 2.4 ->
    1.8 s. Both costs are paid once per process, at the first capture. (torch 2.13)

    * ``side_effect_replay_policy="silent"``: "Mutating object of type ..." messages, each with
      the whole Python stack above dynamo (0.29 s for four such messages), logged at INFO to
      ``TORCH_LOGS=side_effects``. Side effects are replayed as with the default policy.
    * each FX node's ``file:line in function`` header for ``TORCH_LOGS=trace_call``, computed
      before the log level is checked, tokenizes every traced source file once (0.64 s): the
      function name is left out of the header unless that log is on.
    """
    import torch._dynamo.output_graph as output_graph
    import torch._dynamo.symbolic_convert as symbolic_convert

    with contextlib.ExitStack() as stack:
        if hasattr(torch._dynamo.config, "side_effect_replay_policy"):
            stack.enter_context(torch._dynamo.config.patch(side_effect_replay_policy="silent"))
        trace_call_log = getattr(output_graph, "trace_call_log", None)
        funcname = getattr(symbolic_convert, "get_funcname", None)
        if funcname is not None and trace_call_log is not None and not trace_call_log.isEnabledFor(logging.DEBUG):
            symbolic_convert.get_funcname = lambda filename, line: None
            stack.callback(setattr, symbolic_convert, "get_funcname", funcname)
        yield


def unwrap_compiled(obj):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps; anything else as is."""
    from torch._dynamo.eval_frame import OptimizedModule

    return obj._orig_mod if isinstance(obj, OptimizedModule) else obj


def graph_root_module(gm: fx.GraphModule) -> torch.nn.Module | None:
    """The module whose parameters dynamo lifted into ``gm`` (the ``L['self']`` of their sources),
    read from the frame dynamo is compiling; ``None`` outside a dynamo compile or where the
    parameters do not come from one frame-local or global module.

    After a graph break inside a submodule the resumed frame's root is that submodule.
    """
    from torch._dynamo.source import GetItemSource, GlobalSource, LocalSource
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:
        return None
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is None or source_parameter_name(placeholder_source(node) or "") is None:
            continue
        chain = [source]
        while getattr(chain[-1], "base", None) is not None:
            chain.append(chain[-1].base)
        local = chain.pop()
        if isinstance(local, LocalSource):
            root = tx.f_locals.get(local.local_name)
        elif isinstance(local, GlobalSource):
            root = tx.f_globals.get(local.global_name)
        else:
            continue
        # ``L['args'][0]``: a forward wrapped by a ``*args`` decorator receives the model there.
        while not isinstance(root, torch.nn.Module) and chain and isinstance(chain[-1], GetItemSource):
            try:
                root = root[chain.pop().index]
            except (TypeError, KeyError, IndexError):
                break
        return root if isinstance(root, torch.nn.Module) else None
    return None


def placeholder_example(node: fx.Node) -> torch.Tensor | None:
    """The real tensor dynamo lifted into a placeholder (``grapharg.example``), or ``None``."""
    grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
    try:
        example = grapharg.example if grapharg is not None else None
    except AssertionError:  # the weak reference died
        return None
    return example if isinstance(example, torch.Tensor) else None


def all_parameter_names(module: torch.nn.Module) -> dict[int, tuple[str, ...]]:
    """``id(parameter) → every name`` ``module.named_parameters()`` gives it, first first (a tied
    parameter has several)."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {key: tuple(found) for key, found in names.items()}


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """``id(parameter) → name`` as ``model.named_parameters()`` spells it (first name of a tied one)."""
    return {key: found[0] for key, found in all_parameter_names(unwrap_compiled(model)).items()}


def parameter_aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """A tied parameter's other names, by its first (:func:`parameter_names`'s): GPT-2's
    ``{"transformer.wte.weight": ("lm_head.weight",)}``. Untied parameters are not listed."""
    return {first: tuple(rest) for first, *rest in all_parameter_names(unwrap_compiled(model)).values() if rest}


def source_parameter_name(source: str, *, buffers: bool = False) -> str | None:
    """The FQN of the parameter (or, with ``buffers``, buffer) a dynamo source spells, else ``None``.

    ``L['self']._modules['h']._modules['0']._parameters['weight']`` → ``h.0.weight``.
    """
    kinds = ("_parameters[", "_buffers[") if buffers else ("_parameters[",)
    if not any(kind in source for kind in kinds):
        return None
    rest = _ROOT.sub("", source)
    rest = _ITEM.sub(lambda m: "." + next(g for g in m.groups() if g is not None), rest)
    return rest.lstrip(".")


def size_hint(value: int | torch.SymInt) -> int:
    """A concrete int for a possibly symbolic size: its hint under dynamic shapes.

    ``ShapeEnv.optimization_hint`` is torch 2.13's name for the older ``size_hint``.
    """
    if isinstance(value, torch.SymInt):
        env = value.node.shape_env
        hint = getattr(env, "optimization_hint", None) or env.size_hint
        return int(hint(value.node.expr))
    return int(value)


def scalar_hint(value: torch.SymInt | torch.SymFloat | torch.SymBool | int | float | bool):
    """A Python number for a possibly symbolic scalar: the value it was traced at."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        node = value.node
        if node.hint is not None:
            return node.hint
        return {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(value)](
            node.shape_env.evaluate_expr(node.expr))
    return value


def specialize_scalar_inputs(gm: fx.GraphModule) -> int:
    """Replace ``.item()`` of scalar tensor inputs by the number it was traced at; returns how many.

    Under ``dynamic=True`` dynamo passes module float attributes (``dropout_p``, ``eps``,
    ``scaling``) as 0-d tensor inputs read with ``.item()``. Their memoised symbolic value does not
    survive a second AOTAutograd trace (each trace starts a new fake-tensor epoch), so a trace
    made only to analyse the graph fails with ``aten._local_scalar_dense``. For analysis the traced
    value is the right one: the real compile keeps them symbolic.
    """
    count = 0
    for node in list(gm.graph.nodes):
        is_item = (node.op == "call_method" and node.target == "item") or (
            node.op == "call_function" and node.target is torch.Tensor.item)
        if not (is_item and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"):
            continue
        value = node.meta.get("example_value")
        if value is None:
            continue
        node.replace_all_uses_with(scalar_hint(value))
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


def backed_values(shape_env) -> dict:
    """Traced values of the shape symbols (``backed_var_to_val``; ``var_to_val`` before 2.13)."""
    values = getattr(shape_env, "backed_var_to_val", None)
    return values if values is not None else shape_env.var_to_val


def only_symbol(value: torch.SymInt):
    """(symbol, traced value) if ``value`` is an expression of exactly one shape symbol, else None."""
    free = value.node.expr.free_symbols
    if len(free) != 1:
        return None
    symbol = next(iter(free))
    return symbol, int(backed_values(value.node.shape_env)[symbol])


def batch_symbols(values) -> tuple[dict, int] | None:
    """The shape symbols of the batch among a graph's input ``values``, and the batch they were
    traced at: every symbol that is the only one in the leading dimension of a tensor input
    (parameters excluded) and was traced at the same value as the first. Several inputs marked
    dynamic in the batch may get symbols of their own where nothing in the graph equates them (an
    attention mask that is all ones and never read); they all are the batch. ``None``: no
    symbolic batch."""
    symbols: dict = {}
    for value in values:
        if (isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.dim()
                and isinstance(value.shape[0], torch.SymInt)):
            found = only_symbol(value.shape[0])
            if found is not None and found[1] == next(iter(symbols.values()), found[1]):
                symbols[found[0]] = found[1]
    return (symbols, next(iter(symbols.values()))) if symbols else None


def evaluate_at(value: torch.SymInt, assignment: dict) -> int:
    """``value`` with the symbols in ``assignment`` set, every other symbol at its traced value."""
    expr = value.node.expr.subs(assignment)
    if expr.free_symbols:
        hints = backed_values(value.node.shape_env)
        expr = expr.subs({s: hints[s] for s in expr.free_symbols if s in hints})
    return int(expr)


# --------------------------------------------------------------------------- AOTAutograd


def aot_trace(gm: fx.GraphModule, partition_fn, decompositions=None, *, static: bool = False,
              at: dict | None = None) -> None:
    """Run ``gm`` through AOTAutograd once, calling ``partition_fn(joint, inputs, **kw)`` on its joint
    graph; nothing is compiled and nothing is left behind for the real compile.

    Example inputs are the placeholders' ``example_value`` s (dynamo's fake tensors); a fresh
    ``TracingContext`` over their fake mode keeps this trace's guards and metadata separate.
    ``static=True`` traces a symbolic graph at its traced sizes instead (fresh fake tensors of
    the hint shapes, symbolic scalars as their hints): about half the cost where only the
    structure of the partition is wanted, not sizes as functions of the batch. ``at`` (with
    ``static``) sets some shape symbols to other values than their hints, ``{batch: b₀ + 1}``:
    the same graph at another batch size.
    """
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.aot_autograd import aot_module_simplified

    example_inputs = [n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder")]
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if static and _has_symbols(example_inputs):
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        example_inputs = [_static_twin(v, fake_mode, at or {}) for v in example_inputs]
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    # The graphs this trace makes (joint, forward, backward) are read, never run: their Python
    # code is generated only if something asks for it, as Inductor's own compile does. Eager
    # code generation was 0.7 s of a warm 7B three-block plan's 4.3 s (three traces, serial).
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)), _use_lazy_graph_module(True):
        aot_module_simplified(
            gm, example_inputs, fw_compiler=boxed_nop, bw_compiler=boxed_nop,
            partition_fn=partition_fn, decompositions=decompositions,
        )


def _has_symbols(values) -> bool:
    return any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
        isinstance(d, torch.SymInt) for d in (*v.shape, *v.stride()))) for v in values)


def _static_twin(value, fake_mode, at: dict):
    """``value`` at its traced sizes (the symbols in ``at`` at their values there), in ``fake_mode``."""
    if isinstance(value, torch.SymInt) and at:
        return evaluate_at(value, at)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return scalar_hint(value)
    return fake_twin(value, fake_mode, at=at) if isinstance(value, torch.Tensor) else value


def fake_twin(value: torch.Tensor, fake_mode, device: torch.device | None = None, *,
              at: dict | None = None) -> torch.Tensor:
    """A fake tensor like ``value`` in ``fake_mode``: its (traced) sizes, strides, dtype and
    ``requires_grad``, on ``device`` (default: ``value``'s); a parameter stays a parameter.
    ``at``: shape symbols set to other values than their hints (see :func:`evaluate_at`)."""
    def concrete(d):
        return evaluate_at(d, at) if at and isinstance(d, torch.SymInt) else size_hint(d)

    with fake_mode:
        twin = torch.empty_strided([concrete(d) for d in value.shape], [concrete(d) for d in value.stride()],
                                   dtype=value.dtype, device=device or value.device)
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(twin, requires_grad=value.requires_grad)
    differentiable = value.is_floating_point() or value.is_complex()
    return twin.requires_grad_(value.requires_grad) if differentiable else twin


def primal_placeholders(joint: fx.GraphModule) -> list[fx.Node]:
    """The joint graph's forward inputs, in the dynamo graph's placeholder order.

    AOTAutograd names them ``primals_1 … primals_n`` in the order of the module's inputs (the
    tangents come after, named ``tangents_*``).
    """
    return [n for n in joint.graph.find_nodes(op="placeholder") if n.name.startswith("primals")]


def dynamo_origin(node: fx.Node) -> str | None:
    """The name of the dynamo-graph node a joint-graph node was traced from.

    Reads ``node.meta["from_node"]``, the provenance chain AOTAutograd records (outermost first).
    """
    chain = node.meta.get("from_node")
    return chain[0].name if chain else None


def is_storage_view(node: fx.Node) -> bool:
    """Whether a joint-graph node aliases its first argument's storage instead of owning one."""
    target = node.target
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if target is operator.getitem:  # one output of split/unbind/chunk: a view of their input
        return is_storage_view(node.args[0])
    if target is torch.ops.aten._unsafe_view.default:  # aliases its input without view tracking
        return True
    return bool(getattr(target, "is_view", False)) or _view_ops().is_view(node)


def storage_root(node: fx.Node) -> fx.Node:
    """The node owning the storage that ``node`` views (``node`` itself if it owns one)."""
    while is_storage_view(node):
        node = node.args[0]
    return node


_OP_TYPES: Any = None


def _view_ops():
    global _OP_TYPES
    if _OP_TYPES is None:
        from torch._functorch.partitioners import get_default_op_list

        _OP_TYPES = get_default_op_list()
    return _OP_TYPES


def parameter_placeholders(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, str, bool]]:
    """(placeholder, FQN, is a parameter) for each dynamo placeholder that is a parameter or buffer."""
    for node in gm.graph.find_nodes(op="placeholder"):
        source = placeholder_source(node)
        if source is None:
            continue
        name = source_parameter_name(source, buffers=True)
        if name is not None:
            yield node, name, source_parameter_name(source) is not None


def joint_parameter_inputs(gm: fx.GraphModule, joint: fx.GraphModule) -> set[str]:
    """Names of the joint graph's placeholders that are parameters or buffers of ``gm``."""
    state = {node for node, _, _ in parameter_placeholders(gm)}
    dynamo_inputs: Sequence[fx.Node] = gm.graph.find_nodes(op="placeholder")
    return {
        primal.name for dyn, primal in zip(dynamo_inputs, primal_placeholders(joint)) if dyn in state
    }
