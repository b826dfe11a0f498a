"""Draw a :class:`~wtacompile.Plan`: where the saved bytes go per layer, and the peak vs the budget.

Two panels side by side:

* per layer, the input bytes dense training saves for it against what the plan keeps (one bar
  pair per linear, in plan order);
* the predicted peak, dense and planned, as stacked bars of parameters, gradients, optimizer
  state, saved activations and backward transient, with the budget as a line.

matplotlib is an optional extra (``pip install 'wtacompile[plot]'``).
"""

from __future__ import annotations

import os

from wtacompile.plan_result import GIB, MIB, Plan

__all__ = ["plot_plan"]

# Peak = parameters + optimizer + max(activations + transient, gradients + step temporaries): the
# bars stack the training-pass side; the marker is the predicted peak (the larger side).
_PARTS = ("parameters", "optimizer", "activations", "transient")


def plot_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write the two-panel picture of ``plan`` to ``path`` (the format follows the suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Plan.plot needs matplotlib: pip install 'wtacompile[plot]'") from None

    fig, (layers_ax, peak_ax) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=(3, 1))
    layers = [layer for layer in plan.layers if layer.baseline_bytes > 0]
    x = range(len(layers))
    layers_ax.bar([i - 0.2 for i in x], [layer.baseline_bytes / MIB for layer in layers], 0.4,
                  label="dense", color="#9e9e9e")
    layers_ax.bar([i + 0.2 for i in x], [layer.planned_bytes / MIB for layer in layers], 0.4,
                  label="plan", color="#1f77b4")
    layers_ax.set_xticks(list(x), [_short(layer.weight) for layer in layers], rotation=90, fontsize=6)
    layers_ax.set_ylabel("saved input (MiB)")
    layers_ax.set_title(f"saved activations per linear, batch {plan.batch_size}"
                        + (f" x {plan.seq_len}" if plan.seq_len else ""))
    layers_ax.legend()

    unit, scale = ("GiB", GIB) if plan.baseline_peak_bytes >= GIB else ("MiB", MIB)
    breakdown = plan.breakdown
    for column, prefix in ((0, "baseline_"), (1, "")):
        bottom = 0.0
        for part, color in zip(_PARTS, ("#4c72b0", "#55a868", "#c44e52", "#8172b3")):
            value = breakdown.get(prefix + part, breakdown.get(part, 0)) / scale
            peak_ax.bar(column, value, 0.6, bottom=bottom, color=color, label=part if column else None)
            bottom += value
    peaks = (plan.baseline_peak_bytes / scale, plan.peak_bytes / scale)
    peak_ax.plot([0, 1], peaks, "k_", markersize=30, markeredgewidth=2, label="predicted peak")
    peak_ax.axhline(plan.mem_gb * 1e9 / scale, color="black", linestyle="--",
                    label=f"budget {plan.mem_gb:.3g} GB")
    peak_ax.set_xticks([0, 1], ["dense", "plan"])
    peak_ax.set_ylabel(unit)
    peak_ax.set_title("fits" if plan.fits else "does not fit")
    peak_ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(weight: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` → ``3.self_attn.q_proj``: the readable part."""
    parts = weight.removesuffix(".weight").split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0]:] if digits else parts[-2:])
