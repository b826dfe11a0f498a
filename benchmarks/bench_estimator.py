"""Statistics of the weight-gradient estimators, measured: variance ratios and mean z².

    python benchmarks/bench_estimator.py

For a fixed (X, dY) with heavy-tailed (log-normal row norms) and flat rows, draws many sampled
weight gradients through wtacompile.sampled_linear and reports, per method: total variance
(sum over elements), its ratio to uniform, and mean z² of the sample mean against the exact
dYᵀX (≈ 1 for an unbiased estimator).
"""

from __future__ import annotations

import argparse

import torch

from wtacompile import sampled_linear


def draws(x, grad_out, method, keep_ratio, n):
    w = torch.zeros(grad_out.shape[1], x.shape[1], requires_grad=True)
    out = []
    for _ in range(n):
        y = sampled_linear(x, w, keep_ratio=keep_ratio, method=method, min_rows=1)
        out.append(torch.autograd.grad(y, w, grad_out)[0])
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--keep-ratio", type=float, nargs="+", default=[0.3, 0.1])
    args = parser.parse_args()
    torch.manual_seed(0)
    n, d, o = args.rows, 32, 16
    directions = torch.randn(n, d)
    directions /= directions.norm(dim=1, keepdim=True)
    inputs = {"heavy (lognormal σ=1.5)": directions * torch.exp(1.5 * torch.randn(n, 1)),
              "flat (gaussian)": torch.randn(n, d)}
    grad_out = torch.randn(n, o)
    print(f"N={n} rows, D={d}, out={o}, {args.draws} draws per cell")
    print(f"{'rows':<24} {'keep':>5} {'method':<8} {'total var':>12} {'/uniform':>9} {'/crs':>7} {'mean z²':>8}")
    for label, x in inputs.items():
        exact = grad_out.t() @ x
        for ratio in args.keep_ratio:
            stats = {}
            for method in ("uniform", "crs", "wtacrs"):
                s = draws(x, grad_out, method, ratio, args.draws)
                z = (s.mean(0) - exact) / (s.std(0) / args.draws**0.5)
                stats[method] = (s.var(0).sum().item(), (z**2).mean().item())
            for method, (var, z2) in stats.items():
                print(f"{label:<24} {ratio:>5.2f} {method:<8} {var:>12.4g} {var / stats['uniform'][0]:>9.3f} "
                      f"{var / stats['crs'][0]:>7.3f} {z2:>8.3f}")


if __name__ == "__main__":
    main()
