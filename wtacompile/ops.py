r"""The sampled-save linear: exact forward, exact ``dX``/``db``, unbiased ``dW`` from saved rows.

Two steps, so that linears reading one input share one sample and the forward GEMM stays an
ordinary matmul that Inductor compiles (and fuses) as it would in dense training:

1. :func:`sample_input` — once per saved input ``x`` (flattened to ``(N, D)``): its row norms, the
   random choice ``index``/``scale`` from them (the custom op ``wtacompile::sample_rows``, i.e.
   :func:`~wtacompile.estimator.select_rows`), and the compact rows
   ``x_saved = x[index] · scale[:, None]`` (``k × D``);
2. :func:`linear_with_sampled_grad` — per linear reading ``x``: ``F.linear(x, W, b)``, whose
   autograd saves ``W``, ``index`` and ``x_saved`` — not ``x`` — and computes in backward, with
   ``G = dY`` flattened to ``(N, out)``:

   * ``dX = G W`` (exact, needs no activation),
   * ``db = Σ_i G_i`` (exact),
   * ``dW ≈ G[index]ᵀ x_saved = Σ_t s_t G_{i_t}ᵀ X_{i_t}`` (unbiased for every linear sharing the
     sample; see :mod:`wtacompile.estimator`).

The random choice is made once, in forward, and never re-drawn: ``sample_rows`` carries
``torch.Tag.nondeterministic_seeded`` (declaring it random: Inductor never constant-folds it), and
under ``torch.compile`` :mod:`wtacompile.lower` keeps the partitioner from moving it into backward.
Under AOTAutograd the autograd function is traced into plain aten ops: the partitioner sees that
backward needs ``x_saved`` and ``index``, and may recompute ``x_saved`` from ``x`` when it keeps
``x`` anyway (the gather is cheap), which costs no memory and still shrinks the ``dW`` GEMM.

Under autocast both steps cast as ``F.linear`` would (rows drawn and saved in its dtype; backward
then computes in it wherever it runs, and each gradient comes back in its operand's dtype).
:func:`sampled_linear` is both steps for one linear; use it rather than the raw ops: it validates
arguments, casts once for both steps, and skips all sampling work where it cannot pay (frozen
weight, no grad, ``keep_ratio == 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from wtacompile import grad_predictor, kernels
from wtacompile.estimator import DEFAULT_MIN_ROWS, num_kept_rows, select_rows, validate_sampling_args

__all__ = ["RowSample", "linear_with_sampled_grad", "sample_input", "sampled_linear"]


@torch.library.custom_op(
    "wtacompile::sample_rows",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),
)
def _sample_rows_op(scores: torch.Tensor, k: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, scale)`` of ``k`` rows chosen by their scores (int64, float32)."""
    selection = select_rows(scores, k, method)
    return selection.index, selection.scale


@_sample_rows_op.register_fake
def _(scores, k, method):
    return scores.new_empty((k,), dtype=torch.int64), scores.new_empty((k,), dtype=torch.float32)


class RowSample(NamedTuple):
    """One sample of an input's rows: ``dW ≈ G[index]ᵀ x_saved`` for every linear reading it."""

    index: torch.Tensor  # (k,) int64, rows of the input flattened to (N, D)
    x_saved: torch.Tensor  # (k, D): those rows, pre-multiplied by their scales


def sample_input(x: torch.Tensor, keep_ratio: float, method: str = "wtacrs",
                 min_rows: int = DEFAULT_MIN_ROWS, cells: Optional[torch.Tensor] = None,
                 states: Sequence[torch.Tensor] = ()) -> RowSample:
    """Draw the rows of ``x`` (flattened over its leading dims) that weight gradients will use.

    With ``cells`` (each row's cell, :func:`wtacompile.grad_predictor.row_cells`) and the
    ``states`` of the weights that will read the sample, rows score ``‖X_i‖ · w_i``, the
    gradient-aware scores of :mod:`wtacompile.grad_predictor`; otherwise ``‖X_i‖``.
    """
    dtype = _autocast_dtype(x)
    if dtype is not None:
        # The matmuls read x cast to autocast's dtype: the rows are drawn from and saved as that
        # (as dense autograd saves the cast input), with autocast off so nothing is cast twice.
        with torch.autocast(x.device.type, enabled=False):
            return sample_input(x.to(dtype), keep_ratio, method, min_rows, cells, states)
    x2d = x.detach().reshape(-1, x.shape[-1])
    k = num_kept_rows(x2d.shape[0], keep_ratio, min_rows)
    # Compiled, the norms and the gather are plain ops: Inductor fuses the norms into the kernel
    # that produces x and the gather with its scaling, and the partitioner may recompute the
    # gather from x in backward where it keeps x anyway. Eager, the kernels do it in one pass.
    compiling = torch.compiler.is_compiling()
    norms = (torch.linalg.vector_norm(x2d, dim=1, dtype=torch.float32) if compiling
             else kernels.row_norms(x2d))
    if cells is not None and states:
        predicted = grad_predictor.predict([state.detach() for state in states], cells)
        norms = norms * grad_predictor.row_weights(*predicted)
    index, scale = _sample_rows_op(norms, k, method)
    if not compiling:
        return RowSample(index, kernels.gather_scale(x2d, index, scale))
    # Indexing (aten.index), not index_select: the min-cut partitioner may recompute only
    # allow-listed ops, and indexing is one of them.
    return RowSample(index, (x2d[index].float() * scale[:, None]).to(x2d.dtype))


class _SampledGradLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, index, x_saved, cells, state, nonfinite_marker):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _x, weight, bias, index, x_saved, cells, state, nonfinite_marker = inputs
        ctx.has_bias = bias is not None
        ctx.nonfinite_marker = nonfinite_marker
        ctx.learns = cells is not None and state is not None
        # The state itself is not needed: backward returns what it observed as the state's
        # "gradient" (grad_predictor.learning_state folds it in).
        ctx.save_for_backward(weight, index, x_saved, *((cells,) if ctx.learns else ()))

    @staticmethod
    def backward(ctx, grad_out):
        weight, index, x_saved, *cells = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if needs_x:
            grad_x = grad_out.matmul(weight)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if needs_b and ctx.has_bias:
            grad_b = grad_2d.sum(0)
        if needs_w:
            # db's column sums already carry any non-finite dY entry: read out values, not N·out.
            marker = (_nonfinite_marker(grad_b if grad_b is not None else grad_2d) if ctx.nonfinite_marker
                      else None)
            grad_w = _sampled_weight_grad(grad_2d, index, x_saved, marker).to(weight.dtype)
        grad_state = None
        if ctx.learns and ctx.needs_input_grad[6]:
            grad_state = grad_predictor.observation(cells[0], grad_2d.detach())
        return grad_x, grad_w, grad_b, None, None, None, grad_state, None


def _sampled_weight_grad(grad_2d: torch.Tensor, index: torch.Tensor, x_saved: torch.Tensor,
                         marker: Optional[torch.Tensor]) -> torch.Tensor:
    """``(G[index] + m)ᵀ x_saved``, ``m`` the :func:`_nonfinite_marker` (``0`` or NaN; none: ``0``).

    The gather-fused Triton GEMM where it runs, the marker added to its result. Elsewhere the
    float32 reference's plain ops, which Inductor fuses with whatever produced ``G``, the marker
    added to the gathered rows: the add joins the gather's kernel, where one added to the
    ``(out, in)`` result becomes the bias of an ``addmm``, which first writes the broadcast marker
    over the whole result (measured on CPU: every weight gradient written twice; T5's 8192-row
    tied embedding 8.3 against 2.3 ms). ``m = 0`` leaves every entry as it was; ``m`` NaN makes
    every entry NaN either way.
    """
    if kernels.uses_triton(grad_2d):
        grad_w = kernels.sampled_weight_grad(grad_2d, index, x_saved)
        return grad_w if marker is None else grad_w + marker.to(grad_w.dtype)
    if marker is None:
        return kernels.sampled_weight_grad_reference(grad_2d, index, x_saved)
    # The reference's steps with the add between gather and matmul: on the k gathered rows, not
    # on all N of G (eager, that would be a pass over the whole of dY).
    rows = grad_2d.index_select(0, index).float() + marker
    return (rows.t() @ x_saved.float()).to(x_saved.dtype)


def _nonfinite_marker(grad: torch.Tensor) -> torch.Tensor:
    """``0`` if every entry of ``grad`` is finite, else ``NaN`` (a 0-d float32 tensor; no host sync).

    ``grad`` is ``dY``, or ``db = Σ_i G_i`` where the linear has a bias: a non-finite entry of a
    column of ``dY`` makes that column's sum non-finite, and ``db`` is ``out`` values, not ``N·out``.
    (A finite fp16 ``dY`` whose column sum overflows makes ``db`` Inf too; the step is skipped by
    ``GradScaler`` on ``db`` whatever ``dW`` holds.)

    Rows that are not drawn never reach ``G[index]ᵀ x_saved``; an Inf/NaN in one of them would
    vanish from ``dW`` where the dense gradient carries it on to ``GradScaler``'s overflow check.
    ``0·max G + 0·min G`` is ``0`` for finite ``G`` and ``NaN`` otherwise (``max``/``min``
    propagate NaN, ``+Inf`` is the max, ``-Inf`` the min, and ``0·±Inf`` is NaN). Unlike a sum,
    extremes cannot overflow, whatever the dtype. Two reductions over ``G``, no temporary.
    """
    return grad.amax().float() * 0.0 + grad.amin().float() * 0.0


def linear_with_sampled_grad(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             index: torch.Tensor, x_saved: torch.Tensor,
                             cells: Optional[torch.Tensor] = None,
                             state: Optional[torch.Tensor] = None, *, nonfinite_marker: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient is ``G[index]ᵀ x_saved`` (a
    :class:`RowSample` of ``x``); ``dX`` and ``db`` are exact. ``weight`` is ``(out, in)``.

    With ``cells`` and ``state`` (this weight's, :func:`wtacompile.grad_predictor.state_for`),
    backward also returns what ``dY``'s row norms teach as ``state``'s gradient
    (:func:`~wtacompile.grad_predictor.observation`), which the state folds in.

    ``nonfinite_marker=False`` leaves out what carries a non-finite ``dY`` into ``dW``
    (:func:`_nonfinite_marker`): only for graphs traced to read what forward saves (which it,
    a backward read of ``dY``, cannot change), never for one that trains.
    """
    dtype = _autocast_dtype(x)
    if dtype is not None:
        # As F.linear under autocast: every operand cast to its dtype, autocast off inside. Then
        # backward computes in that dtype too (it runs outside the autocast region where that was
        # entered inside a compiled function) and the casts' own backward returns each gradient in
        # its parameter's dtype.
        with torch.autocast(x.device.type, enabled=False):
            return _SampledGradLinear.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                            index, x_saved.to(dtype), cells, state, nonfinite_marker)
    return _SampledGradLinear.apply(x, weight, bias, index, x_saved, cells, state, nonfinite_marker)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``x`` to for a matmul here, or ``None`` (autocast is off, or
    leaves ``x`` alone: it casts float32, not float64 or integers)."""
    device_type = x.device.type
    if (x.is_floating_point() and x.dtype != torch.float64 and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return None


def sampled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    keep_ratio: float = 0.3,
    method: str = "wtacrs",
    min_rows: int = DEFAULT_MIN_ROWS,
    grad_state: Optional[torch.Tensor] = None,
    cells: Optional[torch.Tensor] = None,
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
        grad_state: this weight's learned ``‖dY‖`` prediction
            (:func:`wtacompile.grad_predictor.state_for`): rows score ``‖X_i‖·ĝ_i`` (floored) instead
            of ``‖X_i‖``, and backward updates it. ``None``: norm-only scores.
        cells: each row's cell (:func:`wtacompile.grad_predictor.row_cells`, e.g. with the batch's
            ``attention_mask``); default: by position in the sequence (``x``'s dim ``-2``) alone.

    Raises:
        ValueError: ``keep_ratio`` outside ``(0, 1]``, unknown ``method``, or ``min_rows < 1``.
    """
    validate_sampling_args(keep_ratio, method, min_rows)
    if keep_ratio == 1.0 or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    learning = ()
    if grad_state is not None:
        if cells is None:
            num_rows = x.numel() // x.shape[-1]
            cells = grad_predictor.row_cells(num_rows, x.shape[-2] if x.dim() >= 3 else 1, x.device)
        elif cells.shape != (x.numel() // x.shape[-1],) or cells.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cells must be one int32/int64 cell per row of x, shape "
                             f"({x.numel() // x.shape[-1]},); got {cells.dtype} {tuple(cells.shape)} "
                             "(make them with wtacompile.grad_predictor.row_cells)")
        learning = (cells, grad_state)
    dtype = _autocast_dtype(x)
    if dtype is not None:  # cast once here (each step would cast x again, eager)
        with torch.autocast(x.device.type, enabled=False):
            return _sampled(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                            keep_ratio, method, min_rows, learning)
    return _sampled(x, weight, bias, keep_ratio, method, min_rows, learning)


def _sampled(x, weight, bias, keep_ratio, method, min_rows, learning):
    cells, state = learning or (None, None)
    sample = sample_input(x, float(keep_ratio), method, min_rows, cells, (state,) if learning else ())
    return linear_with_sampled_grad(x, weight, bias, sample.index, sample.x_saved, cells, state)
