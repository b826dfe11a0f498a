"""What the backend keeps per compiled model: its ``mem_gb`` ledger, and the check of its settings.

The backend sees one graph at a time; a model is the module dynamo compiles (the ``L['self']`` of
the graph's parameter sources, :func:`wtacompile._compat.graph_root_module`). Graphs resumed after a
graph break inside a submodule belong to the model that submodule is part of. Models are held
weakly: deleting one deletes what is kept for it, and nothing is shared between two models, even
ones compiled with the same options.

**Budget.** Each graph of a model compiled under ``options={"mem_gb": X}`` commits the bytes its plan
predicts; the next graph plans within what is left. A recompile of a graph (same parameters)
replaces its entry.

**Settings.** ``keep_ratios`` (or a plan) made on the bare model are renamed to the compiled
model's names (DDP's ``module.`` prefix); naming none of its weights is an error, naming some it
lacks or ``include``/``exclude`` patterns that match none of its parameters a warning: a BERT plan
applied to a Llama must not train dense without a word.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import sys
import warnings
import weakref

import torch

from wtacompile._compat import unwrap_compiled

__all__ = ["BudgetLedger", "align_settings", "graph_key", "ledger_for", "owning_model"]

log = logging.getLogger("wtacompile")


def graph_key(example_inputs) -> frozenset[int]:
    """A graph's key in its model's ledger: its parameters (a recompile of it has the same)."""
    return frozenset(id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter))


class BudgetLedger:
    """Bytes committed by each graph of one model under one config, keyed by its parameters."""

    def __init__(self) -> None:
        # graph (its parameters' ids) -> (bytes committed, keep ratio per weight)
        self._graphs: dict[frozenset[int], tuple[int, dict[str, float]]] = {}
        self._partitioner_budgets: dict[frozenset[int], float] = {}

    def committed_by_others(self, graph: frozenset[int]) -> int:
        """What the model's other graphs committed (a recompile of ``graph`` replaces its own)."""
        return sum(nbytes for key, (nbytes, _) in self._graphs.items() if key != graph)

    def earlier_ratios(self, graph: frozenset[int]) -> dict[str, float]:
        """Keep ratios (per weight) an earlier compile of ``graph`` chose; empty if none."""
        return dict(self._graphs.get(graph, (0, {}))[1])

    def earlier_partitioner_budget(self, graph: frozenset[int]) -> float | None:
        """The partitioner budget an earlier compile of ``graph`` chose; ``None`` if none."""
        return self._partitioner_budgets.get(graph)

    def entry(self, graph: frozenset[int]) -> tuple:
        """What the ledger holds for ``graph`` (to :meth:`restore` after trying other choices)."""
        return self._graphs.get(graph), self._partitioner_budgets.get(graph)

    def restore(self, graph: frozenset[int], entry: tuple) -> None:
        """Put back what :meth:`entry` returned for ``graph``."""
        for store, value in zip((self._graphs, self._partitioner_budgets), entry):
            if value is None:
                store.pop(graph, None)
            else:
                store[graph] = value

    def commit(self, graph: frozenset[int], nbytes: int, ratios: dict[str, float],
               partitioner_budget: float | None = None) -> None:
        self._graphs[graph] = (nbytes, dict(ratios))
        if partitioner_budget is not None:
            self._partitioner_budgets[graph] = partitioner_budget


_LEDGERS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, BudgetLedger]] = weakref.WeakKeyDictionary()


def owning_model(root: torch.nn.Module | None) -> torch.nn.Module | None:
    """The compiled model ``root`` belongs to: a model seen before that has ``root`` among its
    modules, else ``root`` itself (registered as a model from now on)."""
    if root is None:
        return None
    for model in list(_LEDGERS.keys()):
        if _contains(model, root):
            return model
    model = _outermost_caller_owning(root)
    _LEDGERS[model] = {}
    return model


def _outermost_caller_owning(root: torch.nn.Module) -> torch.nn.Module:
    """The model ``root`` is part of, from the Python call stack: the module ``torch.compile``
    wrapped if its ``OptimizedModule`` is a caller, else the outermost caller's ``self`` that has
    ``root`` among its modules.

    The first graph dynamo hands us may start inside a submodule (the model's own frame broke
    before any parameter was used, e.g. on a logging call; or each block was compiled in place
    for FSDP2); the model whose ``forward`` runs it is still on the stack.
    """
    owner = root
    frame = sys._getframe(1)
    while frame is not None:
        caller = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        candidate = unwrap_compiled(caller)
        if isinstance(candidate, torch.nn.Module) and candidate is not owner and _contains(candidate, owner):
            owner = candidate
            if candidate is not caller:  # what the user compiled: callers above are not the model
                break
        frame = frame.f_back
    return owner


def _contains(model: torch.nn.Module, module: torch.nn.Module) -> bool:
    return any(m is module for m in model.modules())  # identity: modules may define __eq__


def ledger_for(model: torch.nn.Module | None, fingerprint: str) -> BudgetLedger:
    """The ``mem_gb`` ledger of ``model`` (see :func:`owning_model`) for the config ``fingerprint``."""
    if model is None:
        log.warning("wtacrs mem_gb: cannot tell which model this graph belongs to (its parameters "
                    "are not attributes of one module); it is budgeted on its own")
        return BudgetLedger()
    return _LEDGERS.setdefault(model, {}).setdefault(fingerprint, BudgetLedger())


def align_settings(config, model: torch.nn.Module):
    """``config`` with its ``keep_ratios`` named as ``model`` names its parameters.

    A plan made on the bare model names ``0.up.weight``; under a wrapper (DDP's ``module.``, a
    training module holding the model) the same parameter is ``module.0.up.weight``. Each name
    that is not one of ``model``'s is matched to the single parameter name it is a dotted suffix
    of (or that is a dotted suffix of it) and renamed; a name matching none, or several, is not.

    Raises ``ValueError`` if no name matches (a plan for another model); warns for names that do
    not, and for ``include``/``exclude`` patterns matching no parameter.
    """
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    known = set(names)

    def aligned(weight: str) -> str | None:
        base, sep, use = weight.partition("#")
        if base in known:
            return weight
        candidates = [n for n in names if n.endswith("." + base) or base.endswith("." + n)]
        return candidates[0] + sep + use if len(candidates) == 1 else None

    renamed = {w: aligned(w) for w, _ in config.keep_ratios}
    missing = [w for w, name in renamed.items() if name is None]
    example = ", ".join(n for n in names if n.endswith(".weight"))[:160]
    if missing and len(missing) == len(config.keep_ratios):
        raise ValueError(
            f"wtacrs: keep_ratios (or the plan) name {len(missing)} weights and this "
            f"{type(model).__name__} has none of them (e.g. {', '.join(missing[:3])}); its weights "
            f"are named like {example}. Make the plan for this model (wtacompile.plan(model, ...)) "
            "or fix the names."
        )
    if missing:
        warnings.warn(f"wtacrs: keep_ratios name {len(missing)} weight(s) this {type(model).__name__} "
                      f"does not have (or has several of), ignored: {', '.join(missing[:5])}",
                      stacklevel=2)
    for kind in ("include", "exclude"):
        unmatched = [p for p in getattr(config, kind) if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            warnings.warn(f"wtacrs: {kind} pattern(s) {', '.join(map(repr, unmatched))} match no "
                          f"parameter of this {type(model).__name__} (names look like {names[0]!r})",
                          stacklevel=2)
    if all(name == weight for weight, name in renamed.items() if name is not None):
        return config
    ratios = {renamed[w]: r for w, r in config.keep_ratios if renamed[w] is not None}
    return dataclasses.replace(config, keep_ratios=tuple(sorted(ratios.items())))
