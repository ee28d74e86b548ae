"""lint(): analyse a model and return a Report of findings (no rewriting)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import targets
from .advise import select_rules
from .analysis import analyze
from .context import Context
from .errors import ConfigError
from .options import option
from .plan import Plan
from .policy import PlanRequest, resolve_plan
from .render import FORMATS
from .report import FAIL_ON, Commands, LintSection, Report, model_definition
from .rewrite import materialize_lazy
from .torchutil import as_input_tuple, require_module, require_type


def _codes(values: tuple[str, ...]) -> tuple[str, ...]:
    """Rule codes given as repeated or comma-separated values."""
    return tuple(code.strip() for value in values for code in value.split(",") if code.strip())


@dataclass(frozen=True)
class LintOptions:
    """What `normswap lint` reports and fixes, and how (every field is an option of the command;
    `format`, `fail_on`, `select` and `ignore` also come from `[tool.normswap]`)."""

    output_format: str = option(
        "text",
        "--format",
        help="Report format (default: text, a table that groups per rule beyond 10 findings): "
        "grouped (per rule: count, layers, worst example), full (each finding with its line and fix), concise (one line each), "
        "json, markdown (with suggestion blocks), sarif (with fixes).",
        config_key="format",
        choices=FORMATS,
    )
    statistics: bool = option(
        False, "--statistics", help="Print the number of findings per rule instead of the findings.", value_type=bool
    )
    output: str | None = option(
        None, "--output", "-o", help="Write the report to FILE (atomically) instead of stdout.", path="file"
    )
    fail_on: str = option(
        "error",
        "--fail-on",
        help="Exit 1 when findings reach this severity (default: error).",
        config_key="fail_on",
        choices=FAIL_ON,
    )
    select: tuple[str, ...] = option(
        (),
        "--select",
        help="Only these rule codes or prefixes (repeatable, or comma-separated).",
        config_key="select",
        multiple=True,
        metavar="CODE",
        parse=_codes,
    )
    ignore: tuple[str, ...] = option(
        (),
        "--ignore",
        help="Skip these rule codes or prefixes.",
        config_key="ignore",
        multiple=True,
        metavar="CODE",
        parse=_codes,
    )
    fix: bool = option(
        False,
        "--fix",
        help="Rewrite the model's source to build what `convert` produces with the same --to (or --plan); safe fixes "
        "only (frozen and batchnorm keep the function).",
        value_type=bool,
    )
    unsafe_fixes: bool = option(
        False,
        "--unsafe-fixes",
        help="Also apply (with --fix) or show (with --diff) the fixes that change the function: groupnorm, layernorm.",
        value_type=bool,
    )
    diff: bool = option(
        False,
        "--diff",
        help="Print the fixes as a unified diff and write nothing; exit 1 when a fix is pending.",
        value_type=bool,
    )
    to: str = option(
        "auto",
        "--to",
        help="Recommend, and fix the source toward, this target on every site instead of auto's choice per site "
        "(e.g. batchnorm: SyncBatchNorm back to torch's BatchNorm).",
        choices=targets.choices,
    )
    plan_path: str | None = option(
        None,
        "--plan",
        help="Fix the source to this plan.json (e.g. convert's) instead of auto's.",
        path="existing-file",
    )
    keep: tuple[str, ...] = option(
        (),
        "--keep",
        help="Leave this BatchNorm site as it is in the fixes and the recommendation (repeatable).",
        multiple=True,
        metavar="LAYER",
    )

    def __post_init__(self) -> None:
        if self.output_format not in FORMATS:
            raise ConfigError(f"Unknown format '{self.output_format}'; use one of {', '.join(FORMATS)}.")
        if self.fail_on not in FAIL_ON:
            raise ConfigError(f"--fail-on must be one of {', '.join(FAIL_ON)}, got '{self.fail_on}'.")
        if self.diff and self.fix:
            raise ConfigError("--diff shows the fixes without writing them; use it without --fix.")
        if self.to not in targets.choices():
            raise ConfigError(f"Unknown target '{self.to}'; use one of {', '.join(targets.choices())}.")
        if self.plan_path and self.to != "auto":
            raise ConfigError("--plan decides every site's target; use it without --to.")
        if self.statistics and self.output_format in ("markdown", "sarif"):
            raise ConfigError(f"--statistics prints counts as text or json, not {self.output_format}.")


def lint(
    model: nn.Module,
    example_inputs: Any,
    context: Context | None = None,
    *,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    name: str | None = None,
    plan: Plan | None = None,
    keep: Collection[str] = (),
    to: str = "auto",
    planned_by: str | None = None,
    commands: Commands | None = None,
) -> Report:
    """Find every BatchNorm site of `model` and judge it against `context`.

    Args:
        model: the model (never modified, except that lazy modules are initialized by one eval
            forward on `example_inputs`, as `convert` does).
        example_inputs: tensor or tuple of tensors, batch first.
        context: training / serving context (default: nothing known).
        select, ignore: rule codes or prefixes ("NS1") to run / skip.
        name: how the model is named in the report (default: its class name).
        plan: the plan the recommendation follows (checked against the model) instead of what
            `convert(to=to)` would plan; `keep`: sites that plan leaves as they are.
        to: the target the recommendation puts on every site ("auto": per site, as `convert`
            decides); a site it cannot replace is kept, with the reason.
        planned_by, commands: what made the plan (default: `--to TARGET`, or "auto") and the
            commands that act on it, for the report's recommendation (the CLI gives them).

    Returns:
        Report with `.findings`, `.sites`, `.lint` (`.auto_plan`: sites per target the plan
        converts), renderers (`to_text`, `to_json`, `to_markdown`, `to_sarif`) and
        `exit_code(fail_on=...)`.
    """
    require_module(model, "lint")
    require_type(context, Context, "context", "lint", "build one with normswap.Context(batch_size=..., ...)")
    require_type(plan, Plan, "plan", "lint", "read one with normswap.Plan.read(path)")
    context = context or Context()
    materialize_lazy(model, as_input_tuple(example_inputs))  # a lazy layer has no channel count before its first call
    analysis = analyze(model, example_inputs, context, select_rules(select, ignore))
    recommended = resolve_plan(
        analysis.sites, analysis.findings, context, plan, PlanRequest(to=to, keep=tuple(keep)), strict=False
    )
    planned_by = planned_by or ("auto" if to == "auto" else f"--to {to}")
    return Report(
        model=name or type(model).__name__,
        capture_method=analysis.capture.method,
        context=context,
        sites=analysis.sites,
        findings=analysis.findings,
        fallback_reasons=analysis.capture.fallback_reasons,
        model_location=model_definition(model),
        not_fired=analysis.skipped,
        lint=LintSection(recommended, planned_by, commands),
    )
