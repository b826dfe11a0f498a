"""Kernels of the sampled path, behind one dispatch point.

* :func:`row_norms` — per-row L2 norms (the sampling scores), float32 out.
* :func:`gather_scale` — the compact saved buffer ``x[index] * scale[:, None]``.
* :func:`sampled_weight_grad` — ``grad_out[index]ᵀ @ x_saved`` with the gather inside the GEMM.

Each is a ``torch.library`` op (``wtacompile::…``). Where Triton is importable they are
``triton_op`` s, so Inductor sees through them; they launch Triton kernels on CUDA tensors, and on
CPU tensors too when ``TRITON_INTERPRET=1`` (how CI tests the real kernels). Everywhere else they
run the float32 torch references in :mod:`wtacompile.kernels.reference`.
"""

from __future__ import annotations

import torch

from wtacompile.kernels import ops as _ops  # noqa: F401  (registers torch.ops.wtacompile.*)
from wtacompile.kernels.ops import TRITON_AVAILABLE, uses_triton
from wtacompile.kernels.reference import (
    gather_scale_reference,
    row_norms_reference,
    sampled_weight_grad_reference,
)

__all__ = [
    "TRITON_AVAILABLE",
    "gather_scale",
    "gather_scale_reference",
    "row_norms",
    "row_norms_reference",
    "sampled_weight_grad",
    "sampled_weight_grad_reference",
    "uses_triton",
]


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-row L2 norms of a 2-D tensor, float32 ``(N,)``."""
    return torch.ops.wtacompile.row_norms(x)


def gather_scale(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x[index] * scale[:, None]`` in one pass, in ``x.dtype``; ``(k, D)``."""
    return torch.ops.wtacompile.gather_scale(x, index, scale)


def sampled_weight_grad(
    grad_out: torch.Tensor, index: torch.Tensor, x_saved: torch.Tensor
) -> torch.Tensor:
    """``grad_out[index]ᵀ @ x_saved``: ``(N, out)``, ``(k,)``, ``(k, in)`` → ``(out, in)``."""
    return torch.ops.wtacompile.sampled_weight_grad(grad_out, index, x_saved)
