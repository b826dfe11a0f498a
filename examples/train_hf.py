"""Fine-tune an unmodified Hugging Face model under torch.compile(backend="wtacrs").

Trains the same model from the same initial weights twice, a few AdamW steps each: once under the
inner compiler alone and once under wtacrs, and prints the activation bytes autograd saved for
backward (counted independently of the backend's own report), the losses, and what wtacrs decided.

    python examples/train_hf.py                       # BERT-style model, Inductor
    python examples/train_hf.py --model llama --inner aot_eager --keep-ratio 0.1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import wtacompile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import FAMILIES, build_model  # noqa: E402


def train(model, batch, backend, options, steps):
    compiled = torch.compile(model, backend=backend, options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    losses, saved, start = [], 0, time.perf_counter()
    for step in range(steps):
        with wtacompile.SavedTensorMeter(params) as meter:
            loss = compiled(**batch).loss
        saved = max(saved, meter.activation_bytes)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0:
            first = time.perf_counter() - start
    return losses, saved, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", choices=FAMILIES, default="bert")
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor")
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, batch = build_model(args.model, args.batch_size, args.seq_len)
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"batch {args.batch_size} x {args.seq_len}, {args.steps} AdamW steps, inner={args.inner}")

    baseline_backend = "inductor" if args.inner == "inductor" else "aot_eager"
    base_losses, base_saved, base_compile = train(
        copy.deepcopy(model), batch, baseline_backend, None, args.steps)
    options = {"keep_ratio": args.keep_ratio, "inner": args.inner}
    losses, saved, compile_s = train(model, batch, "wtacrs", options, args.steps)

    print()
    for report in wtacompile.compile_reports():
        if report.training and report.sites:
            print(report)
            print()
    print(f"{'':<22}{'saved activations':>20}{'ratio':>8}{'first step (compile)':>24}  losses")
    print(f"{baseline_backend + ' alone':<22}{base_saved / 2**20:>16.2f} MiB{1.0:>8.2f}"
          f"{base_compile:>22.1f} s  {' '.join(f'{v:.3f}' for v in base_losses)}")
    print(f"{'wtacrs ' + str(args.keep_ratio):<22}{saved / 2**20:>16.2f} MiB"
          f"{saved / base_saved:>8.2f}{compile_s:>22.1f} s  {' '.join(f'{v:.3f}' for v in losses)}")


if __name__ == "__main__":
    main()
