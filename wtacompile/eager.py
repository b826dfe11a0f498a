"""Eager mode: route every trainable ``F.linear`` of an unmodified model through the sampled op.

No compiler involved, so it is the easy way to debug a model under sampling, and the reference
that the compiled path is tested against::

    with wtacompile.sample_linears(keep_ratio=0.3):
        loss = model(**batch).loss
    loss.backward()  # backward may run outside the block: the choices were made in forward
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from wtacompile._compat import all_parameter_names
from wtacompile.config import as_patterns, check_row_scores
from wtacompile.estimator import DEFAULT_MIN_ROWS, validate_sampling_args
from wtacompile.grad_predictor import row_cells, state_for
from wtacompile.ops import sampled_linear

__all__ = ["sample_linears"]


class _SampledLinearMode(TorchFunctionMode):
    def __init__(self, keep_ratio: float, method: str, min_rows: int, weight_filter,
                 row_scores: str, attention_mask, labels) -> None:
        super().__init__()
        self.keep_ratio = keep_ratio
        self.method = method
        self.min_rows = min_rows
        self.weight_filter = weight_filter
        self.row_scores = row_scores
        self.attention_mask = attention_mask
        self.labels = labels
        self._cells: dict[tuple, torch.Tensor] = {}

    def _learning(self, x: torch.Tensor, weight: torch.Tensor) -> dict:
        if self.row_scores != "gradient" or x.dim() < 3:  # (B, D) rows are all one cell
            return {}
        return {"grad_state": state_for(weight), "cells": self._cells_for(x)}

    def _cells_for(self, x: torch.Tensor) -> torch.Tensor:
        num_rows = x.numel() // x.shape[-1]
        key = (num_rows, x.shape[-2] if x.dim() >= 3 else 1, x.device)
        if key not in self._cells:
            # The batch's mask and labels describe these rows where x is (B, T, D) like them (a
            # flattened x could be in another order: it is left to position alone).
            mask, labels = (t if t is not None and x.dim() == 3 and tuple(t.shape) == tuple(x.shape[:2]) else None
                            for t in (self.attention_mask, self.labels))
            row_layout = mask if mask is not None else labels
            seq_len = row_layout.shape[-1] if row_layout is not None else key[1]
            self._cells[key] = row_cells(num_rows, seq_len, x.device, mask, labels)
        return self._cells[key]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            x, weight, bias = _linear_args(args, kwargs)
            if weight.requires_grad and torch.is_grad_enabled() and self.weight_filter(weight):
                return sampled_linear(
                    x, weight, bias,
                    keep_ratio=self.keep_ratio, method=self.method, min_rows=self.min_rows,
                    **self._learning(x, weight),
                )
        return func(*args, **kwargs)


def _linear_args(args, kwargs):
    names = ("input", "weight", "bias")
    values = list(args) + [kwargs[name] for name in names[len(args):] if name in kwargs]
    values += [None] * (3 - len(values))
    return values[0], values[1], values[2]


@contextlib.contextmanager
def sample_linears(
    keep_ratio: float = 0.3,
    *,
    method: str = "wtacrs",
    min_rows: int = DEFAULT_MIN_ROWS,
    model: torch.nn.Module | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    row_scores: str = "gradient",
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> Iterator[None]:
    """Within the block, ``F.linear`` with a weight that requires grad uses :func:`sampled_linear`.

    ``include``/``exclude`` are ``fnmatch`` patterns on parameter names (``"*.mlp.*"``); they need
    ``model`` to know those names. Linears with frozen weights, and everything under
    ``torch.no_grad()``, stay dense.

    ``row_scores="gradient"`` (default) scores rows by ``‖X_i‖`` times a prediction of ``‖dY_i‖``
    learned per weight from earlier backwards (:mod:`wtacompile.grad_predictor`); pass the batch's
    ``attention_mask`` and ``labels`` (``(B, T)``) so that padding and ignored labels are told
    apart. ``"norm"``: ``‖X_i‖`` alone.
    """
    validate_sampling_args(keep_ratio, method, min_rows)
    check_row_scores(row_scores)
    if (include or exclude) and model is None:
        raise ValueError("include/exclude match parameter names: pass model=... as well")
    weight_filter = _name_filter(model, as_patterns("include", include), as_patterns("exclude", exclude))
    with _SampledLinearMode(keep_ratio, method, min_rows, weight_filter, row_scores, attention_mask, labels):
        yield


def _name_filter(model, include, exclude):
    if model is None:
        return lambda weight: True
    names = all_parameter_names(model)  # a tied weight answers to each of its names, as compiled

    def keep(weight: torch.Tensor) -> bool:
        found = names.get(id(weight))
        if found is None:
            return not include
        if include and not any(fnmatch.fnmatchcase(n, pat) for n in found for pat in include):
            return False
        return not any(fnmatch.fnmatchcase(n, pat) for n in found for pat in exclude)

    return keep
