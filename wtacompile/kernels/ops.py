"""Registration of the kernels as ``torch.library`` ops and the one place that picks an impl.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the interpreter);
CPU tensors otherwise take the float32 torch reference. With Triton importable the ops are
``triton_op`` s (Inductor traces into them and schedules the Triton kernels itself); without it
they are plain ``custom_op`` s over the references.
"""

from __future__ import annotations

import os

import torch

from wtacompile.kernels.reference import (
    gather_scale_reference,
    row_norms_reference,
    sampled_weight_grad_reference,
)

try:
    import triton

    from wtacompile.kernels import triton_kernels as _tk

    TRITON_AVAILABLE = True
except ImportError:  # the CPU-only install without the [triton] extra
    TRITON_AVAILABLE = False


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether the ops run Triton kernels for tensors on ``tensor``'s device."""
    if not TRITON_AVAILABLE:
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _row_norms_impl(x: torch.Tensor) -> torch.Tensor:
    if not uses_triton(x):
        return row_norms_reference(x)
    n_rows, n_cols = x.shape
    out = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    block_rows = 16
    grid = (triton.cdiv(n_rows, block_rows),)
    _launch(_tk.row_norms_kernel, grid)(
        x, out, n_rows, n_cols, x.stride(0), x.stride(1),
        BLOCK_ROWS=block_rows, BLOCK_COLS=128,
    )
    return out


def _gather_scale_impl(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if not uses_triton(x):
        return gather_scale_reference(x, index, scale)
    n_kept, n_cols = index.shape[0], x.shape[1]
    out = torch.empty((n_kept, n_cols), device=x.device, dtype=x.dtype)
    block_rows, block_cols = 16, 128
    grid = (triton.cdiv(n_kept, block_rows), triton.cdiv(n_cols, block_cols))
    _launch(_tk.gather_scale_kernel, grid)(
        x, index, scale.float(), out, n_kept, n_cols, x.stride(0), x.stride(1), out.stride(0),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
    )
    return out


def _sampled_weight_grad_impl(
    grad_out: torch.Tensor, index: torch.Tensor, x_saved: torch.Tensor
) -> torch.Tensor:
    if not uses_triton(grad_out):
        return sampled_weight_grad_reference(grad_out, index, x_saved)
    n_kept, n_in = x_saved.shape
    n_out = grad_out.shape[1]
    out = torch.empty((n_out, n_in), device=grad_out.device, dtype=x_saved.dtype)
    block_out, block_in, block_k = 64, 64, 32
    grid = (triton.cdiv(n_out, block_out), triton.cdiv(n_in, block_in))
    precision = "ieee" if grad_out.dtype == torch.float32 else "tf32"
    _launch(_tk.sampled_weight_grad_kernel, grid)(
        grad_out, index, x_saved, out, n_kept, n_out, n_in,
        grad_out.stride(0), grad_out.stride(1), x_saved.stride(0), x_saved.stride(1),
        out.stride(0),
        BLOCK_OUT=block_out, BLOCK_IN=block_in, BLOCK_K=block_k, INPUT_PRECISION=precision,
    )
    return out


def _launch(kernel, grid):
    # wrap_triton makes the launch visible to make_fx/Inductor; the interpreter path is eager-only.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return kernel[grid]
    return torch.library.wrap_triton(kernel)[grid]


if TRITON_AVAILABLE:
    _register = torch.library.triton_op
else:
    _register = torch.library.custom_op


@_register("wtacompile::row_norms", mutates_args=())
def _row_norms_op(x: torch.Tensor) -> torch.Tensor:
    return _row_norms_impl(x)


@_register("wtacompile::gather_scale", mutates_args=())
def _gather_scale_op(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _gather_scale_impl(x, index, scale)


@_register("wtacompile::sampled_weight_grad", mutates_args=())
def _sampled_weight_grad_op(
    grad_out: torch.Tensor, index: torch.Tensor, x_saved: torch.Tensor
) -> torch.Tensor:
    return _sampled_weight_grad_impl(grad_out, index, x_saved)


if not TRITON_AVAILABLE:
    # triton_op derives its fake impl by tracing; plain custom ops need one spelled out.
    @_row_norms_op.register_fake
    def _(x):
        return x.new_empty((x.shape[0],), dtype=torch.float32)

    @_gather_scale_op.register_fake
    def _(x, index, scale):
        return x.new_empty((index.shape[0], x.shape[1]))

    @_sampled_weight_grad_op.register_fake
    def _(grad_out, index, x_saved):
        return x_saved.new_empty((grad_out.shape[1], x_saved.shape[1]))
