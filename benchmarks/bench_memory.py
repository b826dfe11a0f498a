"""Saved-activation bytes (and GPU peak memory) per model family, per configuration, in one run.

    python benchmarks/bench_memory.py --families bert gpt2 llama --batch-size 8 --seq-len 256

Configurations: eager; Inductor; Inductor with activation_memory_budget=0.5; wtacrs at keep 0.3
and 0.1 (Inductor inner), and wtacrs 0.3 on top of the 0.5 budget. Saved bytes are counted by SavedTensorMeter (distinct non-parameter
storages autograd saves), independently of the backend's own report. Peak memory is
torch.cuda.max_memory_allocated over one training step, on a GPU only. Ratios are to Inductor.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import wtacompile  # noqa: E402
from models import FAMILIES, build_model  # noqa: E402

CONFIGS = {
    "eager": (None, None, 1.0),
    "inductor": ("wtacrs", {"keep_ratio": 1.0}, 1.0),
    "inductor+budget0.5": ("wtacrs", {"keep_ratio": 1.0}, 0.5),
    "wtacrs 0.3": ("wtacrs", {"keep_ratio": 0.3}, 1.0),
    "wtacrs 0.1": ("wtacrs", {"keep_ratio": 0.1}, 1.0),
    "wtacrs 0.3+budget0.5": ("wtacrs", {"keep_ratio": 0.3}, 0.5),
}


def measure(model, batch, backend, options, budget, device):
    torch._dynamo.reset()
    fn = model if backend is None else torch.compile(model, backend=backend, options=options)
    params = list(model.parameters())
    with torch._functorch.config.patch(activation_memory_budget=budget):
        start = time.perf_counter()
        fn(**batch).loss.backward()  # compile + warm-up
        compile_s = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with wtacompile.SavedTensorMeter(params) as meter:
            loss = fn(**batch).loss
        loss.backward()
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    model.zero_grad(set_to_none=True)
    return meter.activation_bytes, peak, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=["bert", "gpt2", "llama"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {where}; batch {args.batch_size} x seq {args.seq_len}; inner={args.inner}")
    header = f"{'family':<8} {'config':<20} {'saved MiB':>10} {'x ind.':>7} {'peak MiB':>10} {'x ind.':>7} {'compile s':>10}"
    print(header)
    print("-" * len(header))
    for family in args.families:
        torch.manual_seed(0)
        base_model, batch = build_model(family, args.batch_size, args.seq_len)
        base_model.to(device)
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = {}
        for name in args.configs:
            backend, options, budget = CONFIGS[name]
            if options is not None:
                options = dict(options, inner=args.inner)
            wtacompile.clear_reports()
            rows[name] = measure(copy.deepcopy(base_model), batch, backend, options, budget, device)
            if name == "wtacrs 0.3":
                freeable = _freeable_bytes(wtacompile.compile_reports())
        ref_saved, ref_peak, _ = rows.get("inductor", next(iter(rows.values())))
        for name, (saved, peak, compile_s) in rows.items():
            peak_s = f"{peak / 2**20:>10.1f}" if peak is not None else f"{'n/a':>10}"
            peak_r = f"{peak / ref_peak:>7.2f}" if peak is not None and ref_peak else f"{'':>7}"
            print(f"{family:<8} {name:<20} {saved / 2**20:>10.2f} {saved / ref_saved:>7.2f} "
                  f"{peak_s} {peak_r} {compile_s:>10.1f}")
        if "wtacrs 0.3" in rows:
            print(f"{family:<8} {'(limit)':<20} {freeable / 2**20:>10.2f} {freeable / ref_saved:>7.2f}"
                  "   <- inputs sampling can release, as a share of Inductor's saved bytes")


def _freeable_bytes(reports) -> int:
    """Bytes of the distinct inputs the analysis found sampling releases (the ratio → 0 limit)."""
    # Keyed by the weights reading each input, so a model dynamo compiles twice (HF's BERT heads
    # recompile once after setting config.problem_type) is not counted twice.
    groups = {}
    for report in reports:
        readers = {}
        for site in report.sites:
            if site.verdict == "frees":
                readers.setdefault(site.input_root, []).append(site)
        for sites in readers.values():
            groups[tuple(sorted(s.weight for s in sites))] = sites[0].input_bytes
    return sum(groups.values())


if __name__ == "__main__":
    main()
