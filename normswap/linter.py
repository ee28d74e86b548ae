"""lint(): analyse a model and return a Report of findings (no rewriting)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .advise import select_rules
from .analysis import analyze
from .context import Context
from .policy import make_plan
from .report import Report, model_definition
from .rewrite import materialize_lazy
from .torchutil import as_input_tuple, require_module, require_type


def lint(
    model: nn.Module,
    example_inputs: Any,
    context: Context | None = None,
    *,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    name: str | None = None,
) -> Report:
    """Find every BatchNorm site of `model` and judge it against `context`.

    Args:
        model: the model (never modified, except that lazy modules are initialized by one eval
            forward on `example_inputs`, as `convert` does).
        example_inputs: tensor or tuple of tensors, batch first.
        context: training / serving context (default: nothing known).
        select, ignore: rule codes or prefixes ("NS1") to run / skip.
        name: how the model is named in the report (default: its class name).

    Returns:
        Report with `.findings`, `.sites`, `.auto_plan` (sites per target `convert(to="auto")`
        would produce), renderers (`to_text`, `to_json`, `to_markdown`,
        `to_sarif`) and `exit_code(fail_on=...)`.
    """
    require_module(model, "lint")
    require_type(context, Context, "context", "lint", "build one with normswap.Context(batch_size=..., ...)")
    context = context or Context()
    materialize_lazy(model, as_input_tuple(example_inputs))  # a lazy layer has no channel count before its first call
    analysis = analyze(model, example_inputs, context, select_rules(select, ignore))
    auto = make_plan(analysis.sites, analysis.findings, context, "auto", strict=False)
    return Report(
        model=name or type(model).__name__,
        capture_method=analysis.capture.method,
        context=context,
        sites=analysis.sites,
        findings=analysis.findings,
        fallback_reasons=analysis.capture.fallback_reasons,
        model_location=model_definition(model),
        not_fired=analysis.skipped,
        auto_plan={target: n for target, n in auto.counts().items() if target != "keep"},
    )
