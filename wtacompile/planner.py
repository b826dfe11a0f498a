"""``wtacompile.plan(model, mem_gb=24)``: what fits on a card, before anything runs.

Pipeline: capture (dynamo, on meta tensors) → analyze (the backend's own two AOTAutograd traces
per graph, :func:`wtacompile.passes.classify_sites`) → memory model → solve
(:mod:`wtacompile.solver`, pure) → :class:`Plan`.

Memory model (bytes, at batch ``b``). Activations and the backward transient come from the traced
graphs: exactly at the requested batch; when searching for the largest batch, from one trace with
a symbolic batch dimension evaluated at any ``b`` (max-batch figures for a fixed ``batch_size``
assume proportional scaling from it)::

    resident   = parameters + optimizer state            (state: 2×trainable for Adam/AdamW)
    train peak = resident + saved activations + backward transient
    step peak  = resident + gradients (trainable only) + optimizer-step temporaries
    peak       = max(train peak, step peak)

* saved activations — what the min-cut partitioner saves for backward, parameters excluded;
  with a plan, each sampled group's input is replaced by its compact rows and indices;
* backward transient — what the backward needs beyond the saved activations at its worst
  moment: intermediates, and the gradients it has produced so far (a compiled backward returns
  them together at its end), from a liveness walk over the partitioned backward graph, saved
  inputs released after their last use;
* optimizer-step temporaries — twice the largest trainable parameter (the per-parameter loop's
  ``sqrt``/``div`` buffers).

Frozen parameters have no gradient or state; a frozen linear saves no input (LoRA bases).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from wtacompile.config import WTAConfig
from wtacompile.estimator import DEFAULT_MIN_ROWS
from wtacompile.passes import GraphAnalysis, classify_sites, compact_bytes, find_linears
from wtacompile.report import FREES
from wtacompile.solver import DEFAULT_MENU, GroupChoice, solve

__all__ = [
    "OPTIMIZER_STATES",
    "LayerPlan",
    "Plan",
    "default_example_inputs",
    "plan",
    "plan_graph_ratios",
]

GIB = 2**30
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1, "none": 0}


@dataclass
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


@dataclass
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
    layers: list[LayerPlan] = field(default_factory=list)
    optimizer: str = "adamw"
    advice: str = ""
    min_peak_bytes: int = 0  # predicted peak with every sampleable linear at the smallest ratio

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["layers"] = [LayerPlan(**layer) for layer in data.get("layers", [])]
        return cls(**data)

    def __str__(self) -> str:
        mib = 2**20
        lines = [f"wtacompile plan: batch {self.batch_size}"
                 + (f" x seq {self.seq_len}" if self.seq_len else "")
                 + f", budget {self.mem_gb:g} GB, optimizer {self.optimizer}"]
        header = f"  {'weight':<48} {'in x out':>13} {'saved MiB':>21} {'ratio':>6}  reason"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for layer in self.layers:
            shape = f"{layer.in_features}x{layer.out_features}"
            saved = f"{layer.baseline_bytes / mib:.1f} -> {layer.planned_bytes / mib:.1f}"
            ratio = f"{layer.keep_ratio:.2f}" if layer.keep_ratio < 1 else "exact"
            reason = "" if layer.keep_ratio < 1 else layer.reason
            lines.append(f"  {layer.weight[-48:]:<48} {shape:>13} {saved:>21} {ratio:>6}  {reason}")
        b = self.breakdown
        unit, scale = ("GiB", GIB) if self.baseline_peak_bytes >= GIB else ("MiB", mib)
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
        lines.append(f"  largest batch that fits: {self.baseline_max_batch_size} dense, "
                     f"{self.max_batch_size} with sampling")
        if self.advice:
            lines.append(f"  {self.advice}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- capture + analyze


@dataclass
class _Captured:
    analyses: list[GraphAnalysis]
    batch_size: int


def default_example_inputs(model: torch.nn.Module, batch_size: int, seq_len: int | None,
                           device: torch.device | str = "meta") -> dict[str, torch.Tensor]:
    """Inputs a Hugging Face model trains on, from its config: token ids (and labels for the
    loss), or images for vision models."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no .config: pass example_inputs=... to plan()")
    params = inspect.signature(model.forward).parameters
    inputs: dict[str, Any] = {}
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        inputs["pixel_values"] = torch.zeros(batch_size, channels, size, size, device=device)
        if "labels" in params:
            inputs["labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return inputs
    if seq_len is None:
        raise ValueError("seq_len is needed to plan a text model (or pass example_inputs=...)")
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    inputs["input_ids"] = ids
    if "labels" in params:
        name = type(model).__name__
        if "SequenceClassification" in name:
            inputs["labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        else:
            inputs["labels"] = ids
    if "use_cache" in params:
        inputs["use_cache"] = False  # training: no KV cache
    return inputs


def _twin_device(t: torch.Tensor) -> torch.device:
    # Meta tensors trace badly through autograd (e.g. nll_loss loses its derivative on the meta
    # device), so meta-built models are planned as if on the CPU: fake tensors allocate nothing.
    return torch.device("cpu") if t.device.type == "meta" else t.device


def _fake_twin(t: torch.Tensor, fake_mode) -> torch.Tensor:
    with fake_mode:
        twin = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=_twin_device(t))
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(twin, requires_grad=t.requires_grad)
    return twin.requires_grad_(t.requires_grad) if t.is_floating_point() else twin


@contextlib.contextmanager
def _fake_parameters(model: torch.nn.Module, fake_mode) -> Iterator[None]:
    """Swap every parameter and buffer for a fake twin (same shape, dtype, requires_grad) for the
    duration, so tracing allocates nothing; the originals go back afterwards."""
    swapped = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None:
                    swapped.append((store, name, tensor))
                    store[name] = _fake_twin(tensor, fake_mode)
    try:
        yield
    finally:
        for store, name, tensor in swapped:
            store[name] = tensor


def _capture(model, example_inputs, config: WTAConfig, symbolic_batch: int | None
             ) -> list[GraphAnalysis]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    analyses: list[GraphAnalysis] = []

    def capture_backend(gm, inputs):
        if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in inputs):
            gm = find_linears(gm, config)
            analyses.append(classify_sites(gm, config))
        return gm.forward

    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)

    def fake(value):
        # Inputs stay real (token ids are small): code that inspects them, such as Hugging
        # Face's causal-mask shortcut, must take the path it takes in training.
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return torch.zeros(value.shape, dtype=value.dtype)
        return value

    if isinstance(example_inputs, Mapping):
        args, kwargs = (), {k: fake(v) for k, v in example_inputs.items()}
    else:
        args, kwargs = tuple(fake(v) for v in example_inputs), {}
    if symbolic_batch is not None:
        # A symbolic batch dimension lets one trace be evaluated at every batch size. It costs
        # about twice the tracing time, so it is used only when searching for the batch.
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == symbolic_batch:
                torch._dynamo.maybe_mark_dynamic(value, 0)
    # Planning compiles with its own backend; start and end with clean caches so neither the
    # user's compiled functions nor this capture see the other's entries.
    torch._dynamo.reset()
    try:
        with _fake_parameters(model, fake_mode), torch.enable_grad(), fake_mode:
            torch.compile(model, backend=capture_backend, dynamic=None)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    if not analyses:
        raise ValueError("plan(): the model produced no training graph (nothing requires grad?)")
    return analyses


# --------------------------------------------------------------------------- memory model


@dataclass
class _Model:
    """Everything the memory model needs, in numbers (the planner's side of the adapter).

    Activation-like terms are functions of the batch size: from a trace with a symbolic batch
    dimension, evaluated at each batch (or, from a static trace, exact at the traced batch and
    scaled in proportion elsewhere).
    """

    parameters: int
    gradients: int
    optimizer: int
    step_temporaries: int
    activations: Any  # batch -> dense saved activation bytes
    transient: Any  # batch -> backward transient bytes
    groups: list[tuple[str, Any, Any]]  # (key, SiteGroup, batch -> bytes of its input)
    trace_batch: int

    def resident(self) -> int:
        return self.parameters + self.optimizer

    def fixed_at(self, batch: int) -> int:
        """Train-peak bytes sampling cannot change, at ``batch``."""
        sampleable = sum(root_bytes(batch) for _, _, root_bytes in self.groups)
        return self.resident() + int(self.activations(batch) - sampleable + self.transient(batch))

    def choices_at(self, batch: int, min_rows: int, menu) -> list[GroupChoice]:
        scale = batch / self.trace_batch  # rows are batch x sequence: exactly proportional
        choices = []
        for key, group, root_bytes in self.groups:
            rows = [max(1, round(site.rows * scale)) for site in group.sites]
            sampled = {
                r: sum(compact_bytes(site, r, min_rows, n) for site, n in zip(group.sites, rows))
                for r in menu if r < 1.0
            }
            weight = float(sum(site.in_features * site.out_features for site in group.sites))
            choices.append(GroupChoice(key, int(root_bytes(batch)), sampled, weight))
        return choices

    def step_peak(self) -> int:
        return self.resident() + self.gradients + self.step_temporaries

    def baseline_peak(self, batch: int) -> int:
        train = self.resident() + int(self.activations(batch) + self.transient(batch))
        return max(train, self.step_peak())


def _memory_model(parameters, analyses, optimizer: str, trace_batch: int) -> _Model:
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}")
    unique = {id(p): p for p in parameters}.values()
    param_bytes = sum(p.numel() * p.element_size() for p in unique)
    trainable = [p for p in unique if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)

    b0 = trace_batch
    symbolic = all(a.batch_symbol() is not None for a in analyses)

    @functools.lru_cache(maxsize=None)
    def at(batch: int):
        """(total activations, transient, {group key: input bytes}) at ``batch``."""
        if symbolic:
            per_graph = [a.sizes_at(batch) for a in analyses]
        else:  # a static trace: exact at b0, proportional elsewhere
            k = batch / b0
            per_graph = [(act * k, peak * k, {r: v * k for r, v in roots.items()})
                         for act, peak, roots in (a.sizes_at(None) for a in analyses)]
        # Backward runs the graphs in reverse: while graph g's backward runs, the graphs before
        # it (in forward order) still hold their saved activations; the ones after are done.
        activations = worst = 0
        roots = {}
        for gi, (act, peak, group_bytes) in enumerate(per_graph):
            worst = max(worst, activations + peak)
            activations += act
            roots.update({f"{gi}:{root}": nbytes for root, nbytes in group_bytes.items()})
        return activations, max(worst - activations, 0), roots

    groups = []
    for gi, analysis in enumerate(analyses):
        for g in analysis.groups:
            if g.verdict == FREES:
                key = f"{gi}:{g.root}"
                groups.append((key, g, lambda batch, key=key: at(batch)[2][key]))
    return _Model(
        param_bytes, grad_bytes, OPTIMIZER_STATES[optimizer] * grad_bytes,
        2 * largest if OPTIMIZER_STATES[optimizer] else 0,
        lambda b: at(b)[0], lambda b: at(b)[1], groups, b0,
    )


# --------------------------------------------------------------------------- solve + report


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
) -> Plan:
    """Plan keep ratios so predicted peak memory fits ``mem_gb`` at the least gradient variance.

    Works on a model built on the meta device (nothing is allocated) and on a real one (its
    parameters and buffers are swapped for fake twins while it is traced, then put back). ``example_inputs`` (keyword dict or
    positional tuple) fixes the batch; otherwise inputs come from the model's config at
    ``batch_size`` × ``seq_len``. With ``batch_size=None`` the plan is for the largest batch that
    fits with sampling. A budget that cannot be met gives a plan with ``fits=False`` and advice.
    """
    if not mem_gb or mem_gb <= 0:
        raise ValueError(f"mem_gb must be a positive number of GB, got {mem_gb!r}")
    config = WTAConfig(keep_ratio=0.3, min_rows=min_rows, include=tuple(include),
                       exclude=tuple(exclude), inner=inner)
    budget = int(mem_gb * 1e9)
    if example_inputs is not None:
        first = next(iter(example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs))
        trace_batch = int(first.shape[0])
        inputs = example_inputs
        if batch_size is not None and batch_size != trace_batch:
            raise ValueError(f"batch_size={batch_size} but example_inputs have batch {trace_batch}")
        batch_size = trace_batch
    else:
        trace_batch = batch_size or 2  # 2: batch sizes 0 and 1 are never symbolic
        inputs = default_example_inputs(model, trace_batch, seq_len)
    search = batch_size is None
    analyses = _capture(model, inputs, config, trace_batch if search else None)
    mm = _memory_model(model.parameters(), analyses, optimizer, trace_batch)

    def solve_at(batch: int):
        choices = mm.choices_at(batch, min_rows, menu)
        return choices, solve(choices, budget - mm.fixed_at(batch))

    def fits_sampled(batch: int) -> bool:
        return solve_at(batch)[1].feasible and mm.step_peak() <= budget

    baseline_max = _largest(lambda b: mm.baseline_peak(b) <= budget, max_batch)
    sampled_max = _largest(fits_sampled, max_batch)
    chosen_batch = batch_size if batch_size is not None else max(sampled_max, 1)
    choices, solution = solve_at(chosen_batch)
    ratios = solution.ratios
    s = chosen_batch / trace_batch
    planned_groups = sum(
        c.dense_bytes if ratios[c.name] == 1.0 else c.sampled_bytes[ratios[c.name]] for c in choices
    )
    sampleable = sum(c.dense_bytes for c in choices)
    activations = int(mm.activations(chosen_batch)) - sampleable + planned_groups
    transient = int(mm.transient(chosen_batch))
    peak = max(mm.resident() + activations + transient, mm.step_peak())
    fits = solution.feasible and peak <= budget
    baseline_peak = mm.baseline_peak(chosen_batch)

    keep_ratios, layers = {}, []
    by_key = {key: group for key, group, _ in mm.groups}
    for choice in choices:
        group = by_key[choice.name]
        ratio = ratios[choice.name]
        for site in group.sites:
            share = choice.dense_bytes // len(group.sites)
            planned = share if ratio == 1.0 else choice.sampled_bytes[ratio] // len(group.sites)
            if ratio < 1.0:
                keep_ratios[site.weight] = ratio
            reason = "budget met without sampling it" if ratio == 1.0 else ""
            layers.append(LayerPlan(site.weight, site.in_features, site.out_features,
                                    round(site.rows * s), share, planned, ratio, reason))
    for analysis in analyses:
        for group in analysis.groups:
            if group.verdict != FREES:
                for site in group.sites:
                    layers.append(LayerPlan(site.weight, site.in_features, site.out_features,
                                            round(site.rows * s), 0, 0, 1.0, group.reason))

    need = max(mm.resident() + int(mm.activations(chosen_batch)) - sampleable + transient
               + solution.min_bytes, mm.step_peak())
    advice = ""
    if not fits:
        if mm.step_peak() > budget:
            hint = (f"LoRA, frozen layers or lower-precision weights (parameters, gradients and "
                    f"optimizer state alone need {mm.step_peak() / 1e9:.1f} GB)")
        elif sampled_max >= 1:
            hint = f"a batch of at most {sampled_max}"
        else:
            hint = "shorter sequences, activation checkpointing or a larger budget"
        advice = (f"Does not fit: batch {chosen_batch} needs at least {need / 1e9:.1f} GB even at "
                  f"the smallest keep ratio {min(menu)}; try {hint}.")
    breakdown = {
        "parameters": mm.parameters, "gradients": mm.gradients, "optimizer": mm.optimizer,
        "activations": activations, "transient": transient,
        "baseline_activations": int(mm.activations(chosen_batch)),
        "step_temporaries": mm.step_temporaries,
    }
    return Plan(
        mem_gb=mem_gb, fits=fits, batch_size=chosen_batch, seq_len=seq_len, peak_bytes=peak,
        baseline_peak_bytes=baseline_peak, activation_bytes=activations,
        baseline_activation_bytes=int(mm.activations(chosen_batch)), max_batch_size=sampled_max,
        baseline_max_batch_size=baseline_max, keep_ratios=keep_ratios, breakdown=breakdown,
        layers=layers, optimizer=optimizer, advice=advice, min_peak_bytes=need,
    )


def plan_graph_ratios(analysis: GraphAnalysis, parameters, *, budget_bytes: int, optimizer: str,
                      menu: tuple[float, ...], min_rows: int) -> tuple[dict[str, float], int, bool]:
    """Keep ratios for one captured graph under ``budget_bytes`` (the backend's ``mem_gb``).

    Returns (ratio per weight name, predicted bytes this graph commits, feasible).
    """
    # The graph was traced at the batch it will run with: evaluate it as traced (batch "1" = 1x).
    mm = _memory_model(parameters, [analysis], optimizer, 1)
    choices = mm.choices_at(1, min_rows, menu)
    solution = solve(choices, budget_bytes - mm.fixed_at(1))
    ratios = {}
    by_key = {key: group for key, group, _ in mm.groups}
    planned = 0
    for choice in choices:
        ratio = solution.ratios[choice.name]
        planned += choice.dense_bytes if ratio == 1.0 else choice.sampled_bytes[ratio]
        for site in by_key[choice.name].sites:
            ratios[site.weight] = ratio
    committed = mm.fixed_at(1) + planned
    return ratios, max(committed, mm.step_peak()), solution.feasible and mm.step_peak() <= budget_bytes


def _largest(fits, limit: int) -> int:
    """The largest batch in [1, limit] for which ``fits`` holds (0 if none); fits is monotone."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo

