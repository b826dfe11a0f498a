"""``wtacompile.plan(model, mem_gb=24)``: what fits on a card, before anything runs.

capture (:mod:`.capture`, on fake parameters) → analyze (the backend's own analysis passes) →
memory model (:mod:`wtacompile.memory_model`) → solve (:mod:`wtacompile.solver`) → :class:`Plan`
(:mod:`wtacompile.plan_result`).
"""

from .inputs import default_example_inputs
from .plan import plan
from wtacompile.plan_result import PLAN_SCHEMA, LayerPlan, Plan

__all__ = ["PLAN_SCHEMA", "LayerPlan", "Plan", "default_example_inputs", "plan"]
