"""`normswap lint --fix`: rewrite the model's own source so it builds what the plan converts it to.

The stages: locate (where each site's BatchNorm comes from in the source), emit (the code that
replaces it), branches (the other arms of a selection line), selections (the code around the
model that picks layers by class), apply (rewrite each file with libcst, byte for byte
elsewhere, and write it atomically), fixer (from a plan to edits).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis import analyze
from ..context import Context
from ..plan import Plan
from ..policy import PlanRequest, resolve_plan
from ..targets import DEFAULT_CHANNELS_PER_GROUP, DEFAULT_MAX_GROUPS, PlanOptions
from ..torchutil import require_module, require_type
from .fixer import Edit, FixJob, SourceFixes, plan_fixes
from .locate import Unfixable
from .source_file import FixError

__all__ = ["Edit", "FixError", "FixJob", "SourceFixes", "Unfixable", "fix_source", "plan_fixes"]


def fix_source(
    model: nn.Module,
    example_inputs: Any,
    plan: Plan | None = None,
    context: Context | None = None,
    root: str | Path = ".",
    apply: bool = False,
    unsafe: bool = False,
    *,
    keep: Collection[str] = (),
    to: str = "auto",
    max_groups: int = DEFAULT_MAX_GROUPS,
    channels_per_group: int = DEFAULT_CHANNELS_PER_GROUP,
) -> SourceFixes:
    """The edits that make `model`'s own source build what `plan` converts it to.

    Build the model under `normswap.recording_construction()` first: that is how normswap knows
    which line built each BatchNorm.

    Args:
        model: the model, built under `recording_construction()` (never modified).
        example_inputs: tensor or tuple of tensors, batch first.
        plan: the plan to write into the source (default: what `convert(to=to)` plans in
            `context`, with `keep`, `max_groups` and `channels_per_group`; sites the target
            cannot replace are kept).
        context: training / serving context for the default plan.
        root: the project; files outside it (installed packages too) are never edited.
        apply: write the selected edits (each file atomically); else only compute them.
        unsafe: also select the fixes that change the function (groupnorm, layernorm, syncbn);
            by default only fixes that keep it (frozen, batchnorm) are selected.
        to: the target of the default plan ("auto": per site; "batchnorm": SyncBatchNorm back
            to torch's BatchNorm).

    Returns:
        SourceFixes: `.edits` (file, span, old, new, sites, safety), `.unfixable` (site and
        reason), `.diff()`, `.apply()`.

    Raises:
        FixError: with `apply=True`, a file to change is read-only or changed meanwhile
            (nothing is written).
        PlanError: `plan` does not fit the model.
    """
    require_module(model, "fix_source")
    require_type(context, Context, "context", "fix_source", "build one with normswap.Context(batch_size=..., ...)")
    require_type(plan, Plan, "plan", "fix_source", "read one with normswap.Plan.from_json(text)")
    context = context or Context()
    analysis = analyze(model, example_inputs, context)
    options = PlanOptions(max_groups=max_groups, channels_per_group=channels_per_group)
    given = plan is not None  # a given plan's options are read off its group counts
    plan = resolve_plan(
        analysis.sites, analysis.findings, context, plan, PlanRequest(to, options, tuple(keep)), strict=False
    )
    fixes = plan_fixes([FixJob(model, analysis.sites, plan, options=None if given else options)], Path(root), unsafe)
    if apply:
        fixes.apply()
    return fixes
