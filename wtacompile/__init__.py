"""wtacompile: fine-tune transformers in less memory by sampling what linear layers save.

* :func:`sampled_linear` — ``F.linear`` whose weight gradient is the WTA-CRS estimate from
  a sampled, rescaled subset of input rows (output, ``dX`` and ``db`` exact).
* :func:`sample_linears` — eager mode on an unmodified model.
* ``torch.compile(model, backend="wtacrs", options=...)`` — the compiler backend
  (see :class:`WTAConfig` for options, :func:`last_compile_report` for what it decided).
* :func:`plan` — what fits in a memory budget, before anything runs.
* :func:`sampler_state_dict` / :func:`load_sampler_state_dict` / :func:`reset_sampler_state` —
  the learned ``‖dY‖`` predictions that gradient-aware row scores keep per sampled weight.
"""

from wtacompile.config import WTAConfig
from wtacompile.eager import sample_linears
from wtacompile.estimator import METHODS, RowSelection, num_kept_rows, select_rows
from wtacompile.grad_predictor import load_sampler_state_dict, reset_sampler_state, sampler_state_dict
from wtacompile.memory import SavedTensorMeter
from wtacompile.ops import sampled_linear
from wtacompile.planning import LayerPlan, Plan, plan
from wtacompile.report import (
    GraphReport,
    SiteReport,
    clear_reports,
    compile_reports,
    last_compile_report,
)
from wtacompile.sites import LinearSite

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "GraphReport",
    "LayerPlan",
    "Plan",
    "LinearSite",
    "RowSelection",
    "SavedTensorMeter",
    "SiteReport",
    "WTAConfig",
    "clear_reports",
    "compile_reports",
    "last_compile_report",
    "load_sampler_state_dict",
    "num_kept_rows",
    "plan",
    "reset_sampler_state",
    "sample_linears",
    "sampled_linear",
    "sampler_state_dict",
    "select_rows",
]
