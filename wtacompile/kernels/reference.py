"""Plain float32 torch references for the sampled-path kernels.

These define what each Triton kernel in :mod:`wtacompile.kernels.triton_kernels` must compute; the
tests compare the two, and CPU tensors use these directly (unless ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch


def row_norms_reference(x: torch.Tensor) -> torch.Tensor:
    """``‖x_i‖₂`` of each row of a 2-D tensor, float32."""
    return torch.linalg.vector_norm(x.float(), dim=1)


def gather_scale_reference(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x[index] * scale[:, None]``, product in float32, returned in ``x.dtype``."""
    return (x.index_select(0, index).float() * scale.float()[:, None]).to(x.dtype)


def sampled_weight_grad_reference(
    grad_out: torch.Tensor, index: torch.Tensor, x_saved: torch.Tensor
) -> torch.Tensor:
    """``grad_out[index]ᵀ @ x_saved`` with float32 accumulation, returned in ``x_saved.dtype``.

    ``grad_out`` is ``(N, out)``, ``index`` ``(k,)``, ``x_saved`` ``(k, in)``; the result is
    ``(out, in)``, the sampled estimate of the weight gradient.
    """
    gathered = grad_out.index_select(0, index).float()
    return (gathered.t() @ x_saved.float()).to(x_saved.dtype)
