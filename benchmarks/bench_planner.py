"""The planner's memory model against a measured training step, per model family.

    python benchmarks/bench_planner.py --families bert gpt2 llama t5 vit

For each family (the tests' tiny random-init configs, 4 layers by default, at batch 8): plan with ample memory
(baseline, everything exact) and at a budget halfway between the baseline peak and the least
reachable peak (the plan samples), then run one real AdamW step of each under torch.compile
(aot_eager inner compiler: the same partitioner, and its allocations are visible on the CPU) and
compare predicted with measured saved-activation bytes and peak bytes.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import FAMILIES, build  # noqa: E402

from wtacompile import plan  # noqa: E402
from wtacompile.memory import measure_training_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=["bert", "gpt2", "llama", "t5", "vit"])
    parser.add_argument("--layers", type=int, default=4,
                        help="blocks per stack (4: the plan is composed from three traced blocks)")
    args = parser.parse_args()
    print(f"{'family':<8} {'case':<9} {'act pred':>10} {'act meas':>10} {'err':>7} "
          f"{'peak pred':>10} {'peak meas':>10} {'err':>7}  sampled")
    for family in args.families:
        model, batch = build(family, layers=args.layers)
        batch = {k: v.repeat(4, *([1] * (v.dim() - 1))) for k, v in batch.items()}
        generous = plan(model, 1.0, example_inputs=batch, inner="aot_eager")
        budget = (generous.baseline_peak_bytes + generous.min_peak_bytes) / 2 / 1e9
        tight = plan(model, budget, example_inputs=batch, inner="aot_eager")
        cases = [("baseline", generous, {"inner": "aot_eager", "keep_ratio": 1.0},
                  generous.baseline_activation_bytes, generous.baseline_peak_bytes),
                 ("plan", tight, {"inner": "aot_eager", "plan": tight},
                  tight.activation_bytes, tight.peak_bytes)]
        for name, result, options, act, peak in cases:
            saved, measured_peak = measure_training_step(copy.deepcopy(model), batch, options)
            print(f"{family:<8} {name:<9} {act:>10} {saved:>10} {act / saved - 1:>+7.1%} "
                  f"{peak:>10} {measured_peak:>10} {peak / measured_peak - 1:>+7.1%}  "
                  f"{len(result.keep_ratios)}")


if __name__ == "__main__":
    main()
