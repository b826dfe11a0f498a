"""Run in each of two gloo processes by tests/test_ecosystem.py (DDP and FSDP2 on CPU)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def main(rank: int, world_size: int, port: int, wrapper: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    import wtacompile

    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(MLP(), MLP())
    # Ratios named as a plan of the bare model names them (DDP's are "module.0.up.weight"):
    # sampling at all proves they reached the wrapped model's linears.
    options = {"inner": "aot_eager", "keep_ratio": 1.0,
               "keep_ratios": {f"{b}.{l}.weight": 0.25 for b in (0, 1) for l in ("up", "down")}}
    if wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
        compiled = torch.compile(model, backend="wtacrs", options=options)
    else:  # the FSDP2 recipe: compile each block in place, shard it, then shard the root
        from torch.distributed.fsdp import fully_shard

        for block in model:
            block.compile(backend="wtacrs", options=options)
            fully_shard(block)
        compiled = fully_shard(model)
    torch.manual_seed(1000 + rank)  # each rank draws its own rows (documented: seed per rank)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(rank))
    compiled(x).square().mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
            g = g.full_tensor()
        grads[name] = g.detach().clone()
    sampled = sum(s.sampled for r in wtacompile.compile_reports() for s in r.sites)
    if os.environ.get("WTACRS_DEBUG"):
        print([(s.weight, s.verdict, s.reason) for r in wtacompile.compile_reports() for s in r.sites], flush=True)
    torch.save({"grads": grads, "sampled": sampled}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
