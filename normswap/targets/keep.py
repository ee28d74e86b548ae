"""keep: leave the site as it is (batch-independent already, never called, or chosen by the plan)."""

from __future__ import annotations

from typing import Any

from ..sites import Site
from .base import Param, ParamKind, PlanOptions, Target


class KeepTarget(Target):
    name = "keep"
    summary = "leave the BatchNorm as it is"
    keeps_function = True
    batch_statistics = True
    keeps_batchnorm_op = True
    # why it is kept, as data for readers of plan.json
    parameters = {"unused": Param(ParamKind.BOOL, required=False), "batch_independent": Param(ParamKind.BOOL, required=False)}

    def plan(self, site: Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        return {}, ""


TARGET = KeepTarget()
