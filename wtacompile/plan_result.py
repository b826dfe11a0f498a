"""The planner's answer, :class:`Plan`: a per-layer table, the memory breakdown, and its JSON form.

A leaf module (dataclasses and JSON only), so the config can read a plan without the planner.
The JSON carries a schema version; :meth:`Plan.from_json` rejects any other version, unknown or
missing fields and mistyped values with a ``ValueError`` that names them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

__all__ = ["PLAN_SCHEMA", "LayerPlan", "Plan"]

PLAN_SCHEMA = "wtacompile.plan/3"
# Schemas from_json reads: /1 had no partitioner budget (it was always 1) and no step-time figure;
# /2 no max_batch_reason.
_READABLE_SCHEMAS = ("wtacompile.plan/1", "wtacompile.plan/2", PLAN_SCHEMA)
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class LayerPlan:
    """One linear in the plan."""

    weight: str
    in_features: int
    out_features: int
    rows: int
    baseline_bytes: int  # its share of the input saved for it in dense training
    planned_bytes: int
    keep_ratio: float
    reason: str


@dataclass(frozen=True)
class Plan:
    """The planner's answer. ``print(plan)`` shows the per-layer table and the breakdown."""

    mem_gb: float
    fits: bool
    batch_size: int
    seq_len: int | None
    peak_bytes: int
    baseline_peak_bytes: int
    activation_bytes: int
    baseline_activation_bytes: int
    max_batch_size: int
    baseline_max_batch_size: int
    keep_ratios: dict[str, float]
    breakdown: dict[str, int]
    layers: tuple[LayerPlan, ...] = field(default=())
    optimizer: str = "adamw"
    advice: str = ""
    min_peak_bytes: int = 0  # predicted peak with every sampleable linear at the smallest ratio
    # The partitioner budget chosen with the ratios (torch's activation_memory_budget; 1: the
    # default saved set, no extra recompute), and the predicted step time relative to dense
    # training at budget 1 (wtacompile.time_model).
    activation_memory_budget: float = 1.0
    predicted_step_time: float | None = None  # None: a plan of schema /1, made before the model
    # The largest batch the search tried (plan(max_batch=...)): a largest batch equal to it is a
    # lower bound. None: a plan made before the field was recorded.
    max_batch: int | None = None
    # Why no batch above max_batch can run at all (a sequence classifier without a pad token runs
    # batch 1 only); "": max_batch is only where the search stopped.
    max_batch_reason: str = ""

    @property
    def largest_batch_capped(self) -> bool:
        """Whether ``max_batch_size`` is where the search stopped rather than the largest that
        fits (larger batches may fit too)."""
        return (not self.max_batch_reason and self.max_batch is not None
                and self.max_batch_size >= self.max_batch)

    def plot(self, path: str) -> None:
        """Draw per-layer saved bytes (dense vs plan) and the peak breakdown against the budget to
        ``path`` (PNG, SVG, PDF by suffix); needs matplotlib (``pip install 'wtacompile[plot]'``)."""
        from wtacompile.plan_plot import plot_plan

        plot_plan(self, path)

    def to_json(self) -> str:
        return json.dumps({"schema": PLAN_SCHEMA, **dataclasses.asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read :meth:`to_json`'s output back; anything else raises ``ValueError``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not a wtacompile plan: invalid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("schema") not in _READABLE_SCHEMAS:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a wtacompile plan of schema {PLAN_SCHEMA!r} (found {found!r}); "
                             "make it again with wtacompile.plan(...).to_json()")
        del data["schema"]
        values = _checked_fields(cls, data, "plan")
        layers = values.get("layers", [])
        if not isinstance(layers, list):
            raise ValueError("plan field 'layers' must be a list")
        values["layers"] = tuple(LayerPlan(**_checked_fields(LayerPlan, layer, "plan layer"))
                                 for layer in layers)
        budget = values.get("activation_memory_budget", 1.0)
        if not 0 <= budget <= 1:
            raise ValueError(f"plan activation_memory_budget must be in [0, 1], got {budget!r}")
        for name, ratio in values["keep_ratios"].items():
            if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
                raise ValueError(f"plan keep_ratios[{name!r}] must be a number in (0, 1], got {ratio!r}")
        return cls(**values)

    def __str__(self) -> str:
        lines = [f"wtacompile plan: batch {self.batch_size}"
                 + (f" x seq {self.seq_len}" if self.seq_len else "")
                 + f", budget {self.mem_gb:g} GB, optimizer {self.optimizer}"]
        header = f"  {'weight':<48} {'in x out':>13} {'saved MiB':>21} {'ratio':>6}  reason"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for layer in self.layers:
            shape = f"{layer.in_features}x{layer.out_features}"
            saved = f"{layer.baseline_bytes / MIB:.1f} -> {layer.planned_bytes / MIB:.1f}"
            ratio = f"{layer.keep_ratio:.2f}" if layer.keep_ratio < 1 else "exact"
            reason = "" if layer.keep_ratio < 1 else layer.reason
            lines.append(f"  {layer.weight[-48:]:<48} {shape:>13} {saved:>21} {ratio:>6}  {reason}")
        b = self.breakdown
        unit, scale = ("GiB", GIB) if self.baseline_peak_bytes >= GIB else ("MiB", MIB)
        lines.append("")
        lines.append(f"  memory ({unit})         baseline      plan")
        for key in ("parameters", "gradients", "optimizer", "activations", "transient"):
            base = b.get(f"baseline_{key}", b.get(key, 0))
            lines.append(f"  {key:<16} {base / scale:>11.2f} {b.get(key, 0) / scale:>9.2f}")
        lines.append(f"  {'predicted peak':<16} {self.baseline_peak_bytes / scale:>11.2f} "
                     f"{self.peak_bytes / scale:>9.2f}   budget {self.mem_gb:g} GB = "
                     f"{self.mem_gb * 1e9 / scale:.2f} {unit} -> {'fits' if self.fits else 'DOES NOT FIT'}")
        lines.append("  (peak = parameters + optimizer + max(activations + transient, "
                     "gradients + optimizer-step temporaries))")
        recompute = ("no extra recompute" if self.activation_memory_budget >= 1.0 else
                     f"activation_memory_budget={self.activation_memory_budget:g}: recomputes more")
        timing = ("" if self.predicted_step_time is None else
                  f"; predicted step time {self.predicted_step_time:.2f}x dense training")
        lines.append(f"  partitioner: {recompute}{timing}")
        note = (f" (the search stops at max_batch={self.max_batch}: larger batches may fit too)"
                if self.largest_batch_capped else
                f" (no batch above {self.max_batch} runs: {self.max_batch_reason})" if self.max_batch_reason else "")
        lines.append(f"  largest batch that fits: {self.baseline_max_batch_size} dense, "
                     f"{self.max_batch_size} with sampling{note}")
        if self.advice:
            lines.append(f"  {self.advice}")
        return "\n".join(lines)


def _checked_fields(cls, data, what: str) -> dict:
    """``data``'s fields for ``cls``, each of its annotated type; ``ValueError`` naming what is off."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    missing = sorted(n for n, f in fields.items() if n not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        raise ValueError(f"{what}: unknown field(s) {unknown}, missing field(s) {missing}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _is_instance(value, hints[name]):
            raise ValueError(f"{what} field {name!r} must be {hints[name]}, got {value!r}")
    return dict(data)


def _is_instance(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_instance(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _is_instance(k, key_type) and _is_instance(v, value_type) for k, v in value.items())
    if origin is tuple:  # layers: checked element by element by the caller
        return isinstance(value, list)
    return True
