"""The row draw alone: the host (numpy) and the device (sync-free torch) implementations per call.

    python benchmarks/bench_draw.py [--rows 256 1024 2048 4096] [--ratio 0.3] [--calls 2000]

:func:`wtacompile.select_rows` runs :func:`~wtacompile.estimator.select_rows_on_host` for CPU
scores and :func:`~wtacompile.estimator.select_rows_on_device` elsewhere. On the CPU both can run;
this times them side by side (rounds interleaved, the best round of each kept: the least
disturbed by whatever else the machine does), per number of rows ``N`` at ``k = ceil(ratio·N)``,
on log-normal scores (a few rows dominate: wtacrs keeps some as winners). On a GPU it adds the
device version on the GPU. A draw is a few dozen small ops on ``N`` numbers, so on a CPU each
op's fixed cost is most of its time; called from inside a training step (caches cold after the
GEMMs) every version measured 2–4× slower per call than here.
"""

from __future__ import annotations

import argparse
import time

import torch

from wtacompile.estimator import num_kept_rows, select_rows_on_device, select_rows_on_host


def per_call_us(fn, calls: int, sync=lambda: None) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[256, 1024, 2048, 4096])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    print(f"CPU threads: {torch.get_num_threads()}; µs per call, best of {args.rounds} interleaved rounds")
    header = f"{'N':>6} {'k':>6} {'host':>8} {'device on CPU':>14} {'host / device':>14}"
    print(header + (f" {'device on GPU':>14}" if cuda else ""))
    for n in args.rows:
        k = num_kept_rows(n, args.ratio, 1)
        scores = torch.randn(n).exp()
        arms = {"host": lambda: select_rows_on_host(scores, k),
                "device": lambda: select_rows_on_device(scores, k)}
        syncs = {}
        if cuda:
            on_gpu = scores.cuda()
            arms["gpu"] = lambda: select_rows_on_device(on_gpu, k)
            syncs["gpu"] = torch.cuda.synchronize
        best = {name: float("inf") for name in arms}
        for name, fn in arms.items():  # warm-up
            per_call_us(fn, 50, syncs.get(name, lambda: None))
        for _ in range(args.rounds):
            for name, fn in arms.items():
                best[name] = min(best[name], per_call_us(fn, args.calls, syncs.get(name, lambda: None)))
        line = f"{n:>6} {k:>6} {best['host']:>8.0f} {best['device']:>14.0f} {best['host'] / best['device']:>14.2f}"
        print(line + (f" {best['gpu']:>14.0f}" if cuda else ""))


if __name__ == "__main__":
    main()
