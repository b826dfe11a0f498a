"""A user with X GB: torch's activation_memory_budget alone against wtacrs's joint plan.

    python benchmarks/bench_joint.py --families llama bert --fractions 0.9 0.8 0.7 --steps 8 [--coarse]

For each family, the memory target X is a fraction of dense training's measured peak. Torch
alone: the user tries the partitioner budgets of the menu and takes the largest whose measured
peak fits X (the least recompute that fits). wtacrs: ``wtacompile.plan(model, X)`` chooses the
partitioner budget and the keep ratios together, and the plan is compiled as it is. Peaks are
measured (one AdamW step, profiler memory events, parameters and optimizer state included); the
arms' timed steps are interleaved in one process; every ratio is to dense Inductor at budget 1.
``--coarse`` adds rows where both choose from the coarse menu 1, 0.7, 0.5, 0.3 (the default menu
before it went in steps of 0.1), in the same run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

import wtacompile
from wtacompile.memory import measure_training_step
from wtacompile.solver import DEFAULT_BUDGET_MENU

sys.path.insert(0, str(Path(__file__).parent))
from bench_frontier import FAMILIES, Arm, build  # noqa: E402


def measured(model, batch, budget, options=None):
    """(saved bytes, peak bytes) of one AdamW step at partitioner budget ``budget``."""
    backend = "wtacrs" if options is not None else "inductor"
    with torch._functorch.config.patch(activation_memory_budget=budget):
        return measure_training_step(copy.deepcopy(model), batch, options, backend=backend)


COARSE_MENU = (1.0, 0.7, 0.5, 0.3)


def run_family(family, fractions, steps, warmup, log, menus):
    base, batch = build(family)
    torch_peaks = {}
    for budget in sorted({b for menu in menus.values() for b in menu}, reverse=True):
        torch_peaks[budget] = measured(base, batch, budget)[1]
        log(f"  {family}: Inductor at budget {budget:g} peaks at {torch_peaks[budget] / 2**20:.0f} MiB")
    dense_peak = torch_peaks[1.0]
    rows, arms = [], {1.0: Arm("inductor @1", base, batch, 1.0, None, "cpu")}
    for fraction in fractions:
        for menu_name, menu in menus.items():
            target = fraction * dense_peak
            fitting = [b for b in menu if torch_peaks[b] <= target]
            torch_budget = max(fitting) if fitting else None
            if torch_budget is not None and torch_budget not in arms:
                arms[torch_budget] = Arm(f"inductor @{torch_budget:g}", base, batch, torch_budget, None, "cpu")
            plan = wtacompile.plan(base, target / 1e9, example_inputs=batch, activation_budgets=menu)
            name = f"wtacrs plan {fraction:g} {menu_name}"
            wtacrs_peak = None
            if plan.fits:
                wtacrs_peak = measured(base, batch, 1.0, {"plan": plan})[1]
                arms[name] = Arm(name, base, batch, 1.0, None, "cpu", options={"plan": plan})
            rows.append((fraction, menu_name, target, torch_budget, plan, wtacrs_peak, name))
            log(f"  {family}: target {fraction:g} ({menu_name} menu) -> torch budget {torch_budget}, plan "
                f"budget {plan.activation_memory_budget:g}, {len(plan.keep_ratios)} sampled, fits={plan.fits}")
    for arm in arms.values():
        for _ in range(warmup):
            arm.step()
    for _ in range(steps):
        for arm in arms.values():
            arm.times.append(arm.step())
    time_of = {key: statistics.median(arm.times) for key, arm in arms.items()}
    dense_time = time_of[1.0]
    print(f"{'family':<7} {'target':>6} {'menu':>6} | {'torch budget':>12} {'peak/X':>7} {'time':>6} | "
          f"{'plan budget':>11} {'sampled':>7} {'peak/X':>7} {'time':>6} {'pred':>6} {'vs torch':>8}")
    for fraction, menu_name, target, torch_budget, plan, wtacrs_peak, name in rows:
        if torch_budget is None:
            torch_cols = f"{'none fits':>12} {'':>7} {'':>6}"
            torch_time = None
        else:
            torch_time = time_of[torch_budget] / dense_time
            torch_cols = f"{torch_budget:>12g} {torch_peaks[torch_budget] / target:>7.3f} {torch_time:>6.3f}"
        if wtacrs_peak is None:
            ours = f"{'does not fit':>11}"
        else:
            ours_time = time_of[name] / dense_time
            versus = f"{ours_time / torch_time:>8.3f}" if torch_time else f"{'-':>8}"
            ours = (f"{plan.activation_memory_budget:>11g} {len(plan.keep_ratios):>7} "
                    f"{wtacrs_peak / target:>7.3f} {ours_time:>6.3f} {plan.predicted_step_time:>6.3f} {versus}")
        print(f"{family:<7} {fraction:>6g} {menu_name:>6} | {torch_cols} | {ours}", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=["llama", "bert"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.9, 0.8, 0.7])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per arm (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--coarse", action="store_true",
                        help=f"also choose from the coarse menu {COARSE_MENU} (before/after in one run)")
    args = parser.parse_args()
    menus = {"fine": DEFAULT_BUDGET_MENU, **({"coarse": COARSE_MENU} if args.coarse else {})}
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    print(f"device: CPU, {torch.get_num_threads()} threads; X = fraction of dense Inductor's measured "
          f"peak; times are medians of {args.steps} interleaved steps, relative to dense Inductor")
    for family in args.families:
        run_family(family, args.fractions, args.steps, args.warmup, lambda s: print(s, flush=True), menus)


if __name__ == "__main__":
    main()
