"""A minimal LoRA wrapper, enough to plan (and train) adapters on a frozen base.

``add_lora(model, rank)`` freezes every parameter and wraps each matching ``nn.Linear`` as
``y = base(x) + (α/r)·B(A(x))`` with trainable ``A`` (in → r) and ``B`` (r → out, zero-init).
The frozen base saves no input for backward; ``A`` does — that input is what sampling frees.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LoRALinear", "add_lora"]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0) -> None:
        super().__init__()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        if base.weight.device.type != "meta":
            nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def add_lora(model: nn.Module, rank: int, targets: Sequence[str] = ("*",),
             skip: Sequence[str] = ("*lm_head*", "*classifier*", "*score*")) -> nn.Module:
    """Freeze ``model`` and wrap its ``nn.Linear`` modules whose name matches ``targets``."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if not any(fnmatch.fnmatchcase(name, t) for t in targets) or any(
            fnmatch.fnmatchcase(name, s) for s in skip
        ):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank))
    return model
