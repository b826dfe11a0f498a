"""Triton kernels vs their torch references, and sampled vs dense linear backward (GPU only).

    python benchmarks/bench_kernels.py                  # N=16384, D=4096, out 4096 and 11008, bf16

Times with CUDA events (median of --iters after warm-up); every row is a ratio measured in this
one run. "sampled backward" is dX = dY·W plus the gather-fused dW = dY[idx]ᵀ·x_saved (+ db);
"dense backward" is autograd of F.linear.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from wtacompile import kernels, num_kept_rows, sampled_linear


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out", type=int, nargs="+", default=[4096, 11008])
    parser.add_argument("--keep-ratio", type=float, nargs="+", default=[0.3, 0.1])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (CPU runs use the torch references)")
    dev, dtype = "cuda", torch.bfloat16
    n, d = args.tokens, args.hidden
    print(f"{torch.cuda.get_device_name()}; N={n}, D={d}, {dtype}")
    x = torch.randn(n, d, device=dev, dtype=dtype)
    print(f"{'kernel':<44} {'triton ms':>10} {'torch ms':>10} {'speed-up':>9}")
    rows = [("row_norms", lambda: kernels.row_norms(x), lambda: kernels.row_norms_reference(x))]
    for ratio in args.keep_ratio:
        k = num_kept_rows(n, ratio, 10)
        idx = torch.randint(0, n, (k,), device=dev)
        scale = torch.rand(k, device=dev)
        rows.append((f"gather_scale k={k}", lambda idx=idx, scale=scale: kernels.gather_scale(x, idx, scale),
                     lambda idx=idx, scale=scale: (x[idx].float() * scale[:, None]).to(dtype)))
        for o in args.out:
            g = torch.randn(n, o, device=dev, dtype=dtype)
            xs = torch.randn(k, d, device=dev, dtype=dtype)
            rows.append((f"sampled_weight_grad k={k} out={o}",
                         lambda g=g, idx=idx, xs=xs: kernels.sampled_weight_grad(g, idx, xs),
                         lambda g=g, idx=idx, xs=xs: g[idx].t() @ xs))
    for name, fast, ref in rows:
        t_fast, t_ref = timed(fast, args.iters), timed(ref, args.iters)
        print(f"{name:<44} {t_fast:>10.3f} {t_ref:>10.3f} {t_ref / t_fast:>9.2f}")

    print(f"\n{'linear backward':<44} {'sampled ms':>10} {'dense ms':>10} {'speed-up':>9}")
    for o in args.out:
        w = torch.randn(o, d, device=dev, dtype=dtype, requires_grad=True)
        xg = x.clone().requires_grad_()
        g = torch.randn(n, o, device=dev, dtype=dtype)
        dense_y = F.linear(xg, w)
        t_dense = timed(lambda: torch.autograd.grad(dense_y, (xg, w), g, retain_graph=True), args.iters)
        for ratio in args.keep_ratio:
            y = sampled_linear(xg, w, keep_ratio=ratio)
            t_sampled = timed(lambda: torch.autograd.grad(y, (xg, w), g, retain_graph=True), args.iters)
            print(f"{f'out={o} keep={ratio}':<44} {t_sampled:>10.3f} {t_dense:>10.3f} {t_dense / t_sampled:>9.2f}")


if __name__ == "__main__":
    main()
