"""keep: leave the site as it is (batch-independent already, or chosen by the plan)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sites import Site
from .base import ParamKind, PlanOptions, Target, TargetParams, param


@dataclass(frozen=True, kw_only=True)
class KeepParams(TargetParams):
    """Why it is kept, as data for readers of plan.json."""

    unused: bool | None = param(ParamKind.BOOL, required=False)  # written by normswap before 0.2 for unreached layers
    batch_independent: bool | None = param(ParamKind.BOOL, required=False)  # a look-alike that does not use the batch


class KeepTarget(Target[KeepParams]):
    name = "keep"
    summary = "leave the BatchNorm as it is"
    keeps_function = True
    batch_statistics = True
    keeps_batchnorm_op = True
    converts = False
    params_type = KeepParams

    def plan(self, site: Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        return {}, ""

    def uses_batch_statistics(self, params: KeepParams) -> bool:
        return not params.batch_independent


TARGET = KeepTarget()
