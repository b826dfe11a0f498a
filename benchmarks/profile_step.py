"""Where a training step's time goes: Inductor alone against wtacrs, by kind of work.

    python benchmarks/profile_step.py --family bert --ratio 0.3 [--budget 1] [--steps 3] [--top 25]

Builds the family's benchmark model (:func:`bench_frontier.build`), compiles it under Inductor
alone and under ``backend="wtacrs"`` (Inductor inside), warms both, then profiles ``--steps``
AdamW steps of each with ``torch.profiler`` (Inductor's generated CPU kernels profiled by name).
It prints, per arm, the self time per step of each kind of work (:func:`kind`: weight-gradient
GEMMs told from the others by their output shape, the draw and its eager internals, Inductor's
fused kernels, attention, the optimizer), then the ``--top`` entries that differ most between the arms.
Profiling slows small ops more than large ones, so read shares and differences, not absolute
step times; those come from ``bench_frontier.py``. Runs with glibc keeping freed memory, as
``bench_frontier.py`` does.

A single Inductor kernel's reading can mislead. In BERT's sampled step the kernel that fuses
the GELU with the row norms of its output read 47 ms per call against 17 ms for dense
Inductor's GELU kernel (the same compiled kernel timed alone: 6–8 ms, 12–13 ms right after
an ``addmm``), yet computing the norms in a separate, unfusable op moved the step by
under 1% (1841 against 1856 ms, median of 6 interleaved steps). Confirm a kernel's cost by
changing it and timing whole steps before acting on it.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_frontier import build, keep_freed_memory  # noqa: E402

from wtacompile.backend import wtacrs_backend  # noqa: E402


def kind(name: str, shapes, weight_shapes: set) -> str:
    """The kind of work one profiler event is."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        out = _mm_out_shape(name, shapes)
        return "GEMM: weight gradient" if out in weight_shapes else "GEMM: other"
    # Inductor names a fused kernel after every op it holds: one that writes a GELU may also
    # hold the draw's norms, so kernels are told apart before op names are read.
    if "cpp_fused" in name or name.startswith("graph_"):
        return "Inductor kernels"
    if name == "wtacompile::sample_rows":
        return "draw (sample_rows)"
    if name in _DRAW_OPS:
        return "draw internals"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "Optimizer" in name or "_foreach" in name or "adamw" in name.lower():
        return "optimizer"
    return "other: " + name


_DRAW_OPS = {"aten::argsort", "aten::sort", "aten::multinomial", "aten::cumsum", "aten::argmin",
             "aten::index_add", "aten::index_add_"}


def _mm_out_shape(name, shapes):
    try:
        if name == "aten::mm":
            (m, _), (_, n) = shapes[0], shapes[1]
        elif name == "aten::addmm":
            (m, _), (_, n) = shapes[1], shapes[2]
        else:
            return None
    except (TypeError, ValueError, IndexError):
        return None
    return (m, n)


def profile_arm(fn, model, optimizer, batch, steps):
    from torch.profiler import ProfilerActivity, profile

    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    weight_shapes |= {tuple(reversed(s)) for s in weight_shapes}

    def step():
        fn(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    by_kind = collections.Counter()
    by_name = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        k = kind(event.key, event.input_shapes, weight_shapes)
        by_kind[k] += event.self_cpu_time_total / steps / 1e3
        by_name[(k, event.key)] += event.self_cpu_time_total / steps / 1e3
    return by_kind, by_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--family", default="bert")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    keep_freed_memory()
    from torch._inductor.compile_fx import compile_fx

    torch._inductor.config.cpp.enable_kernel_profile = True
    base, batch = build(args.family)
    arms = {}
    for name, backend in (("inductor", functools.partial(compile_fx)),
                          (f"wtacrs {args.ratio:g}", functools.partial(
                              wtacrs_backend, options={"keep_ratio": args.ratio}))):
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        arms[name] = (torch.compile(model, backend=backend), model, optimizer)
    results = {}
    with torch._functorch.config.patch(activation_memory_budget=args.budget):
        for _ in range(args.warmup):
            for fn, model, optimizer in arms.values():
                fn(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for name, (fn, model, optimizer) in arms.items():
            results[name] = profile_arm(fn, model, optimizer, batch, args.steps)
    names = list(results)
    kinds = sorted({k for by_kind, _ in results.values() for k in by_kind},
                   key=lambda k: -max(results[n][0][k] for n in names))
    print(f"{args.family}, budget {args.budget:g}: self CPU ms per step")
    print(f"{'kind':<40}" + "".join(f"{n:>16}" for n in names))
    for k in kinds[:20]:
        print(f"{k[:40]:<40}" + "".join(f"{results[n][0][k]:>16.1f}" for n in names))
    print(f"{'whole step':<40}" + "".join(f"{sum(results[n][0].values()):>16.1f}" for n in names))
    print(f"\nlargest differences ({names[1]} - {names[0]}):")
    keys = {key for _, by_name in results.values() for key in by_name}
    diffs = sorted(keys, key=lambda key: -abs(results[names[1]][1][key] - results[names[0]][1][key]))
    for key in diffs[:args.top]:
        a, b = results[names[0]][1][key], results[names[1]][1][key]
        print(f"{b - a:>+9.1f}  {a:>8.1f} {b:>8.1f}  {key[0][:24]:<24} {key[1][:90]}")


if __name__ == "__main__":
    main()
