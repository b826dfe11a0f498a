"""The one frozen, validated configuration that flows from ``torch.compile(options=...)`` to every pass.

Usage::

    torch.compile(model, backend="wtacrs", options={"keep_ratio": 0.2, "exclude": ["*lm_head*"]})

``WTAConfig.from_options`` rejects unknown keys (listing the valid ones) and out-of-range values,
so a typo fails at compile time instead of silently training dense.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wtacompile.estimator import DEFAULT_MIN_ROWS, validate_sampling_args
from wtacompile.plan_result import Plan

__all__ = [
    "INNER_COMPILERS",
    "OPTIMIZER_STATES",
    "WTAConfig",
    "as_patterns",
    "check_activation_memory_budget",
    "check_mem_gb",
    "check_row_scores",
]

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
ROW_SCORES = ("gradient", "norm")
# Optimizer state tensors per trainable parameter, for the memory model.
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1, "none": 0}


@dataclass(frozen=True)
class WTAConfig:
    """Options of the ``wtacrs`` backend.

    Attributes:
        keep_ratio: default fraction of rows kept per sampled linear, in ``(0, 1]`` (the paper's 0.3).
        method: ``"wtacrs"``, ``"crs"``, ``"uniform"`` or ``"topk"`` (biased; ablations only).
        min_rows: floor on the number of kept rows per call.
        include: ``fnmatch`` patterns on weight names (``"*.mlp.*"``); empty means every linear.
        exclude: patterns of weights never sampled; wins over ``include``.
        keep_ratios: per-weight ratios (weight FQN → ratio), e.g. from a plan; overrides
            ``keep_ratio``. A ratio of 1.0 leaves that linear exact.
        inner: the compiler the rewritten graph goes on to: ``"inductor"`` (default),
            ``"aot_eager"`` (debugging; no codegen) or ``"eager"`` (no AOTAutograd at all — the
            rewrite still applies, through autograd).
        report: record every decision for :func:`wtacompile.last_compile_report`.
        mem_gb: plan keep ratios on the fly so predicted peak memory fits this many GB (one budget
            shared by every graph of the compiled model); linears are exact where it fits.
        optimizer: the optimizer ``mem_gb`` planning assumes (its state counts against the budget).
        activation_memory_budget: the partitioner budget (torch's
            ``torch._functorch.config.activation_memory_budget``, in ``[0, 1]``: 1 saves what the
            min-cut partitioner saves by default, lower recomputes more) this model's graphs are
            compiled under (a sampled graph possibly at a larger one that saves no more bytes:
            ``match_budget_bytes``). ``None`` (default): torch's global setting, except under
            ``mem_gb``, which picks it with the keep ratios (:data:`wtacompile.solver.DEFAULT_BUDGET_MENU`).
        match_budget_bytes: under a partitioner budget ``B < 1`` you set (``activation_memory_budget``
            here or torch's global), compile a sampled graph at the largest budget of
            ``1, 0.9, …`` above ``B`` whose partition saves no more bytes than the *dense*
            partition at ``B``: the memory you asked for, with less recompute (the sampled graph
            needs less of it to get there). ``False``: at ``B`` itself, which saves fewer bytes
            and recomputes more. Off under ``mem_gb`` and a plan, which fit their own bytes.
        row_scores: how rows are scored for sampling: ``"gradient"`` (default) — ``‖X_i‖`` times
            a prediction of ``‖dY_i‖`` learned online per weight (by position, padding and ignored
            labels; :mod:`wtacompile.grad_predictor`), still unbiased; ``"norm"`` — ``‖X_i‖`` alone.

    ``options={"plan": plan}`` (a :class:`wtacompile.Plan`, its JSON, or a path to that JSON) sets
    ``keep_ratios`` and ``activation_memory_budget`` from the plan and leaves every linear the plan
    does not sample exact.
    """

    keep_ratio: float = 0.3
    method: str = "wtacrs"
    min_rows: int = DEFAULT_MIN_ROWS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_ratios: tuple[tuple[str, float], ...] = field(default=())
    inner: str = "inductor"
    report: bool = True
    mem_gb: float | None = None
    optimizer: str = "adamw"
    activation_memory_budget: float | None = None
    row_scores: str = "gradient"
    match_budget_bytes: bool = True

    def __post_init__(self) -> None:
        validate_sampling_args(self.keep_ratio, self.method, self.min_rows)
        check_row_scores(self.row_scores)
        if self.inner not in INNER_COMPILERS:
            raise ValueError(
                f"unknown inner compiler {self.inner!r}; choose one of {', '.join(INNER_COMPILERS)}"
            )
        for name in ("include", "exclude"):
            object.__setattr__(self, name, as_patterns(name, getattr(self, name)))
        object.__setattr__(self, "keep_ratios", _ratio_table(self.keep_ratios, self.method, self.min_rows))
        if self.mem_gb is not None:
            check_mem_gb(self.mem_gb)
        for name in ("report", "match_budget_bytes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.activation_memory_budget is not None:
            check_activation_memory_budget(self.activation_memory_budget)
            object.__setattr__(self, "activation_memory_budget", float(self.activation_memory_budget))
        if self.optimizer not in OPTIMIZER_STATES:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | WTAConfig | None) -> WTAConfig:
        """Build from ``torch.compile(options=...)``; unknown keys raise ``ValueError``."""
        if options is None:
            return cls()
        if isinstance(options, WTAConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)] + ["plan"]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown wtacrs option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(valid)}"
            )
        kwargs = dict(options)
        if "plan" in kwargs:
            for clash in ("keep_ratio", "keep_ratios", "mem_gb", "activation_memory_budget", "match_budget_bytes"):
                if clash in kwargs:
                    raise ValueError(f"options 'plan' and {clash!r} conflict: the plan sets the ratios "
                                     "and the partitioner budget")
            plan = _read_plan(kwargs.pop("plan"))
            kwargs["keep_ratios"] = dict(plan.keep_ratios)
            kwargs["keep_ratio"] = 1.0  # what the plan does not sample stays exact
            kwargs["activation_memory_budget"] = plan.activation_memory_budget  # 1 too: not torch's global
            kwargs["match_budget_bytes"] = False  # the plan's bytes are the sampled partition's at its budget
        return cls(**kwargs)

    def ratio_for(self, weight_name: str, aliases: Sequence[str] = ()) -> float | None:
        """The keep ratio for a weight, or ``None`` if include/exclude rule it out. A tied weight
        answers to each of its names: ``weight_name`` and its ``aliases`` (GPT-2's head,
        ``transformer.wte.weight``, is excluded by ``"*lm_head*"`` too)."""
        names = (weight_name, *aliases)
        if self.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.include):
            return None
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in self.exclude):
            return None
        ratios = dict(self.keep_ratios)
        return next((ratios[n] for n in names if n in ratios), self.keep_ratio)

    def fingerprint(self) -> str:
        """A short stable hash of every field: different plans never share a compiled graph."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def as_patterns(name: str, value: Any) -> tuple[str, ...]:
    """``include``/``exclude`` as a tuple of patterns; one string is one pattern, not its letters."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise ValueError(f"{name} must be an fnmatch pattern or a list of them (e.g. ['*.mlp.*']), "
                     f"got {value!r}")


def _ratio_table(value: Any, method: str, min_rows: int) -> tuple[tuple[str, float], ...]:
    """``keep_ratios`` as sorted ``(weight FQN, ratio)`` pairs, each ratio checked like ``keep_ratio``."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(name, ratio) for name, ratio in items]
    except (TypeError, ValueError):
        raise ValueError("keep_ratios must map weight names to ratios, e.g. "
                         f"{{'model.layers.0.mlp.up_proj.weight': 0.3}}; got {value!r}") from None
    for name, ratio in pairs:
        if not isinstance(name, str):
            raise ValueError(f"keep_ratios keys must be weight names (str), got {name!r}")
        try:
            validate_sampling_args(ratio, method, min_rows)
        except ValueError as err:
            raise ValueError(f"keep_ratios[{name!r}]: {err}") from None
    return tuple(sorted((name, float(ratio)) for name, ratio in pairs))


def check_mem_gb(mem_gb: Any) -> None:
    """``ValueError`` unless ``mem_gb`` is a positive, finite number (not a bool or a string)."""
    if isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float)) or not (
        math.isfinite(mem_gb) and mem_gb > 0
    ):
        raise ValueError(f"mem_gb must be a positive, finite number of GB (e.g. 24), got {mem_gb!r}")


def check_row_scores(row_scores: Any) -> None:
    """``ValueError`` unless ``row_scores`` is one of :data:`ROW_SCORES`."""
    if row_scores not in ROW_SCORES:
        raise ValueError(f"unknown row_scores {row_scores!r}; choose one of {', '.join(ROW_SCORES)} "
                         "('gradient': ‖X‖ times a learned ‖dY‖ prediction, 'norm': ‖X‖ alone)")


def check_activation_memory_budget(budget: Any) -> None:
    """``ValueError`` unless ``budget`` is a number in ``[0, 1]`` (torch's partitioner budget)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= budget <= 1.0:
        raise ValueError("activation_memory_budget must be a number in [0, 1] (1: the partitioner's "
                         f"default saved set, lower: recompute more), got {budget!r}")


def _read_plan(plan: Any) -> Plan:
    if isinstance(plan, (str, os.PathLike)):
        text = str(plan)
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        plan = Plan.from_json(text)
    if not isinstance(plan, Plan):
        raise ValueError(f"option 'plan' takes a wtacompile.Plan, its JSON or a path, got {type(plan).__name__}")
    if not plan.fits:
        raise ValueError(f"this plan does not fit its {plan.mem_gb:g} GB budget: {plan.advice}")
    return plan
