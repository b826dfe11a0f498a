"""Graph passes of the ``wtacrs`` backend, in pipeline order; each is ``(gm, config) -> gm``.

1. :func:`find_linears` — annotate linear-like nodes with a parameter weight (capture).
2. :func:`analyze_savings` — decide which of them sampling really frees memory for (analyze).
3. :func:`rewrite_sampled` — rewrite the chosen ones into the sampled-save op (rewrite).
4. :func:`pin_sampled_choices` — on the joint graph: the sampling op is saved, never recomputed.

Installed as ``wtacompile.passes``.
"""

from .analyze_savings import (
    GraphAnalysis,
    SiteGroup,
    analyze_savings,
    apply_verdicts,
    classify_sites,
    compact_bytes,
    trace_partition,
)
from .find_linears import META_KEY, find_linears, parameter_fqn
from .pin_sampled_choices import PinSampledChoices, pin_sampled_choices, pinned_min_cut_partition
from .rewrite_sampled import rewrite_sampled

__all__ = [
    "META_KEY",
    "GraphAnalysis",
    "SiteGroup",
    "analyze_savings",
    "apply_verdicts",
    "classify_sites",
    "compact_bytes",
    "find_linears",
    "parameter_fqn",
    "PinSampledChoices",
    "pin_sampled_choices",
    "pinned_min_cut_partition",
    "rewrite_sampled",
    "trace_partition",
]
