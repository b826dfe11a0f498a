"""Graph passes of the ``wtacrs`` backend, in pipeline order; each is ``(gm, config) -> gm``.

1. :func:`find_linears` — annotate linear-like nodes with a parameter weight (capture).
2. :func:`analyze_savings` — decide which of them sampling really frees memory for (analyze).
3. :func:`rewrite_sampled` — rewrite the chosen ones into the sampled-save op (rewrite).

Installed as ``wtacompile.passes``.
"""

from .analyze_savings import analyze_savings, trace_partition
from .find_linears import META_KEY, find_linears, parameter_fqn
from .rewrite_sampled import rewrite_sampled

__all__ = [
    "META_KEY",
    "analyze_savings",
    "find_linears",
    "parameter_fqn",
    "rewrite_sampled",
    "trace_partition",
]
