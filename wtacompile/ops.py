r"""The sampled-save linear: exact forward, exact ``dX``/``db``, unbiased ``dW`` from saved rows.

``torch.ops.wtacompile.sampled_linear(x, weight, bias, keep_ratio, method, min_rows)`` returns
``(out, x_saved, index)``:

* ``out = F.linear(x, weight, bias)`` — the very same call, so it is bit-identical to dense;
* ``x_saved`` ``(k, D)`` — the chosen rows of ``x`` pre-multiplied by their scales;
* ``index`` ``(k,)`` — which rows of the flattened ``x`` they are.

The two extra outputs exist so that what backward needs is *produced by forward*: autograd (and
AOTAutograd's partitioner under ``torch.compile``) saves them, and the random choice is made once,
in forward, and never re-drawn. The op carries ``torch.Tag.nondeterministic_seeded``, which
declares it random (Inductor never constant-folds it); what keeps the partitioner from recomputing
it in backward — which would draw again — is :func:`wtacompile.lower.pin_sampled_choices`.

Backward, with ``G = dY`` flattened to ``(N, out)``:

* ``dX = G W`` (exact, needs no activation),
* ``db = Σ_i G_i`` (exact),
* ``dW ≈ G[index]ᵀ x_saved = Σ_t s_t G_{i_t}ᵀ X_{i_t}`` (unbiased; see :mod:`wtacompile.estimator`).

Use :func:`sampled_linear` rather than the raw op: it validates arguments, applies autocast the
way ``F.linear`` would, and skips all sampling work where it cannot pay (frozen weight, no grad,
``keep_ratio == 1``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from wtacompile import kernels
from wtacompile.estimator import (
    DEFAULT_MIN_ROWS,
    num_kept_rows,
    select_rows,
    validate_sampling_args,
)

__all__ = ["sampled_linear"]


@torch.library.custom_op(
    "wtacompile::sampled_linear",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),
)
def _sampled_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    keep_ratio: float,
    method: str,
    min_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = F.linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    k = num_kept_rows(x2d.shape[0], keep_ratio, min_rows)
    selection = select_rows(kernels.row_norms(x2d), k, method)
    x_saved = kernels.gather_scale(x2d, selection.index, selection.scale)
    return out, x_saved, selection.index


@_sampled_linear_op.register_fake
def _(x, weight, bias, keep_ratio, method, min_rows):
    out = F.linear(x, weight, bias)
    n = x.numel() // x.shape[-1] if x.dim() != 2 else x.shape[0]
    k = num_kept_rows(n, keep_ratio, min_rows)
    x_saved = x.new_empty((k, x.shape[-1]))
    index = x.new_empty((k,), dtype=torch.int64)
    return out, x_saved, index


def _setup_context(ctx, inputs, output):
    x, weight, bias, _keep_ratio, _method, _min_rows = inputs
    _out, x_saved, index = output
    ctx.mark_non_differentiable(x_saved, index)
    ctx.has_bias = bias is not None
    if weight.requires_grad:
        ctx.save_for_backward(weight, x_saved, index)
    else:
        # A frozen weight keeps no activation alive: dX needs only the weight itself.
        ctx.save_for_backward(weight, None, None)


def _backward(ctx, grad_out, _grad_x_saved, _grad_index):
    weight, x_saved, index = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if needs_x:
        grad_x = grad_out.matmul(weight)
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
    if needs_w:
        grad_w = kernels.sampled_weight_grad(grad_2d, index, x_saved).to(weight.dtype)
    if needs_b and ctx.has_bias:
        grad_b = grad_2d.sum(0)
    return grad_x, grad_w, grad_b, None, None, None


_sampled_linear_op.register_autograd(_backward, setup_context=_setup_context)


def sampled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    keep_ratio: float = 0.3,
    method: str = "wtacrs",
    min_rows: int = DEFAULT_MIN_ROWS,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient is estimated from sampled rows of ``x``.

    The output, the input gradient and the bias gradient are exact; the weight gradient is an
    unbiased estimate (for ``method`` in ``"wtacrs"``, ``"crs"``, ``"uniform"``) built from
    ``k = min(N, max(ceil(keep_ratio·N), min_rows))`` rows of the ``N`` rows of ``x`` flattened over
    its leading dims. Only those ``k`` rows (pre-scaled) and their indices are saved for backward.

    Args:
        x: input ``(..., in_features)``; any leading dims, any memory layout.
        weight: ``(out_features, in_features)``.
        bias: optional ``(out_features,)``.
        keep_ratio: fraction of rows kept, in ``(0, 1]``; ``1.0`` is the dense op, no sampling work.
        method: ``"wtacrs"`` (default), ``"crs"``, ``"uniform"``, or ``"topk"`` (biased, ablation).
        min_rows: floor on ``k``.

    Raises:
        ValueError: ``keep_ratio`` outside ``(0, 1]``, unknown ``method``, or ``min_rows < 1``.
    """
    validate_sampling_args(keep_ratio, method, min_rows)
    if keep_ratio == 1.0 or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # The custom op sits below autocast's dispatch key: cast here exactly as F.linear would.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _sampled_linear_op(x, weight, bias, float(keep_ratio), method, min_rows)[0]
    return _sampled_linear_op(x, weight, bias, float(keep_ratio), method, min_rows)[0]
