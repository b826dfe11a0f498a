"""Triton kernels of the sampled path. Each has a float32 torch reference in ``reference.py``.

Block sizes are fixed rather than autotuned: the shapes vary with every batch, and the kernels
are bandwidth-bound (``row_norms``, ``gather_scale``) or a plain tiled GEMM whose K loop is the
gather (``sampled_weight_grad``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_norms_kernel(x_ptr, out_ptr, n_rows, n_cols, stride_row, stride_col,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    acc = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for col_start in range(0, n_cols, BLOCK_COLS):
        cols = col_start + tl.arange(0, BLOCK_COLS)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
        values = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(values * values, axis=1)
    tl.store(out_ptr + rows, tl.sqrt(acc), mask=row_mask)


@triton.jit
def gather_scale_kernel(x_ptr, index_ptr, scale_ptr, out_ptr, n_kept, n_cols,
                        stride_x_row, stride_x_col, stride_out_row,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    slots = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    slot_mask = slots < n_kept
    mask = slot_mask[:, None] & (cols[None, :] < n_cols)
    src_rows = tl.load(index_ptr + slots, mask=slot_mask, other=0).to(tl.int64)
    scales = tl.load(scale_ptr + slots, mask=slot_mask, other=0.0)
    values = tl.load(x_ptr + src_rows[:, None] * stride_x_row + cols[None, :] * stride_x_col,
                     mask=mask, other=0.0).to(tl.float32)
    out = values * scales[:, None]
    tl.store(out_ptr + slots[:, None].to(tl.int64) * stride_out_row + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sampled_weight_grad_kernel(grad_ptr, index_ptr, xs_ptr, out_ptr, n_kept, n_out, n_in,
                               stride_g_row, stride_g_col, stride_xs_row, stride_xs_col,
                               stride_out_row,
                               BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
                               BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # out[o, i] = sum_t grad[index[t], o] * xs[t, i]: the gather of grad rows is the K loop's load.
    outs = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    ins = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    out_mask = outs < n_out
    in_mask = ins < n_in
    acc = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    for k_start in range(0, n_kept, BLOCK_K):
        slots = k_start + tl.arange(0, BLOCK_K)
        slot_mask = slots < n_kept
        rows = tl.load(index_ptr + slots, mask=slot_mask, other=0).to(tl.int64)
        grad_tile = tl.load(grad_ptr + rows[None, :] * stride_g_row + outs[:, None] * stride_g_col,
                            mask=out_mask[:, None] & slot_mask[None, :], other=0.0)
        xs_tile = tl.load(xs_ptr + slots[:, None].to(tl.int64) * stride_xs_row
                          + ins[None, :] * stride_xs_col,
                          mask=slot_mask[:, None] & in_mask[None, :], other=0.0)
        acc = tl.dot(grad_tile, xs_tile.to(grad_tile.dtype), acc, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + outs[:, None].to(tl.int64) * stride_out_row + ins[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=out_mask[:, None] & in_mask[None, :])
