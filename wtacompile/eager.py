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

from wtacompile.config import as_patterns
from wtacompile.estimator import DEFAULT_MIN_ROWS, validate_sampling_args
from wtacompile.ops import sampled_linear

__all__ = ["sample_linears"]


class _SampledLinearMode(TorchFunctionMode):
    def __init__(self, keep_ratio: float, method: str, min_rows: int, weight_filter) -> None:
        super().__init__()
        self.keep_ratio = keep_ratio
        self.method = method
        self.min_rows = min_rows
        self.weight_filter = weight_filter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            x, weight, bias = _linear_args(args, kwargs)
            if weight.requires_grad and torch.is_grad_enabled() and self.weight_filter(weight):
                return sampled_linear(
                    x, weight, bias,
                    keep_ratio=self.keep_ratio, method=self.method, min_rows=self.min_rows,
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
) -> Iterator[None]:
    """Within the block, ``F.linear`` with a weight that requires grad uses :func:`sampled_linear`.

    ``include``/``exclude`` are ``fnmatch`` patterns on parameter names (``"*.mlp.*"``); they need
    ``model`` to know those names. Linears with frozen weights, and everything under
    ``torch.no_grad()``, stay dense.
    """
    validate_sampling_args(keep_ratio, method, min_rows)
    if (include or exclude) and model is None:
        raise ValueError("include/exclude match parameter names: pass model=... as well")
    weight_filter = _name_filter(model, as_patterns("include", include), as_patterns("exclude", exclude))
    with _SampledLinearMode(keep_ratio, method, min_rows, weight_filter):
        yield


def _name_filter(model, include, exclude):
    if model is None:
        return lambda weight: True
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}

    def keep(weight: torch.Tensor) -> bool:
        name = names.get(id(weight))
        if name is None:
            return not include
        if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            return False
        return not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)

    return keep
