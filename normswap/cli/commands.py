"""What the CLI commands do, separated from option parsing."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from ..calibration import HealOptions, resolve_device
from ..config import Config, ModelEntry, load_config
from ..errors import ConfigError
from ..files import write_text_atomic
from ..linter import lint
from ..loader import example_inputs, load_model, parse_input_spec, parse_kwargs
from ..render import RENDERERS
from ..report import Report, model_definition, worst_exit_code
from ..source import relative_path


def _split_codes(values: Sequence[str]) -> list[str]:
    return [code for value in values for code in value.split(",") if code.strip()]


def display_spec(spec: str) -> str:
    """The spec as shown in reports: a file path relative to the repository root, never absolute."""
    location, sep, attribute = spec.rpartition(":")
    if sep and (location.endswith(".py") or "/" in location):
        return f"{relative_path(os.path.abspath(location))}:{attribute}"
    return spec


def model_entries(models: Sequence[str], kwargs: Sequence[str], input_shapes: Sequence[str], config: Config) -> list[ModelEntry]:
    """The models to work on: from the command line, else from [tool.normswap]."""
    if models:
        if not input_shapes:
            raise ConfigError("--input-shape is required with a MODEL (e.g. --input-shape 2,3,224,224).")
        shapes = [parse_input_spec(s) for s in input_shapes]
        return [ModelEntry(spec, parse_kwargs(kwargs), shapes) for spec in models]
    if not config.models:
        raise ConfigError("No MODEL given and no 'models' in [tool.normswap] of the nearest pyproject.toml.")
    return config.models


def run_lint(models, kwargs, input_shapes, output_format, output, fail_on, select, ignore, flags: dict[str, Any]) -> int:
    """`normswap lint`; returns the exit code."""
    config = load_config()
    context = config.make_context(**flags)
    output_format = output_format or config.format or "text"
    if output_format not in RENDERERS:
        raise ConfigError(f"Unknown format '{output_format}'; use one of {', '.join(RENDERERS)}.")
    fail_on = fail_on or config.fail_on or "error"
    select = _split_codes(select) or config.select
    ignore = _split_codes(ignore) or config.ignore
    reports: list[Report] = []
    for entry in model_entries(models, kwargs, input_shapes, config):
        model, factory = load_model(entry.spec, entry.kwargs)
        report = lint(model, example_inputs(entry.input_shapes), context, select=select, ignore=ignore, name=display_spec(entry.spec))
        report.model_location = model_definition(factory) or report.model_location
        reports.append(report)
    code = worst_exit_code(reports, fail_on)  # validates fail_on before anything is written
    if output_format == "text":
        color = output is None and sys.stdout.isatty()
        rendered = RENDERERS["text"](reports, color=color)
    else:
        rendered = RENDERERS[output_format](reports)
    if output:
        write_text_atomic(output, rendered)
    else:
        click.echo(rendered, nl=False)
    return code


def heal_options(options: dict[str, Any]) -> HealOptions | None:
    """HealOptions from the command line (None without --heal or a --heal-* value); a value it
    refuses is a usage error (exit 2)."""
    given = {field: options[f"heal_{field}"] for field in ("steps", "lr", "params") if options[f"heal_{field}"] is not None}
    if not options["heal"] and not given:
        return None
    if not options["calibration_data"]:
        raise ConfigError("Healing needs unlabeled inputs: pass --calibration-data FILE with --heal.")
    try:
        return HealOptions(**given)
    except ValueError as exc:
        raise ConfigError(f"Invalid healing option: {exc}") from None


def device_option(name: str) -> str:
    """--device checked against this machine (a GPU asked for where there is none: exit 2)."""
    try:
        resolve_device(name)
    except ValueError as exc:
        raise ConfigError(f"--device {name}: {exc}") from None
    return name


def parse_batch_inputs(spec: str | None, count: int) -> tuple[int, ...] | None:
    """`--batch-inputs`: "0,2" or "none" (None when not given: detected)."""
    if spec is None:
        return None
    if spec.strip().lower() == "none":
        return ()
    try:
        indices = tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--batch-inputs expects comma-separated input indices or 'none', got '{spec}'.") from None
    wrong = [i for i in indices if not 0 <= i < count]
    if wrong or not indices:
        raise ConfigError(f"--batch-inputs {spec} names no input: there are {count} --input-shape input(s), numbered from 0.")
    return indices


def run_convert(
    checkpoint: str, model_spec: str, kwargs, input_shapes, out_dir: str, quiet: bool, flags: dict[str, Any], options: dict[str, Any]
) -> int:
    """`normswap convert`; returns the exit code."""
    from ..pipeline import ConvertOptions, convert_checkpoint

    if not input_shapes:
        raise ConfigError("--input-shape is required (e.g. --input-shape 1,3,224,224).")
    config = load_config()
    context = config.make_context(**flags)
    if options["trust_checkpoint"]:
        click.echo(
            f"normswap: warning: --trust-checkpoint: '{checkpoint}' may run code while it is loaded; use it only for files you trust", err=True
        )
    convert_options = ConvertOptions(
        to=options["to"],
        max_groups=options["max_groups"],
        channels_per_group=options["channels_per_group"],
        plan_path=options["plan_path"],
        onnx=not options["no_onnx"],
        validate=not options["no_validate"],
        atol=options["atol"],
        rtol=options["rtol"],
        opset=options["opset"],
        trust_checkpoint=options["trust_checkpoint"],
        force=options["force"],
        calibration_data=options["calibration_data"],
        calibration_batch_size=options["calibration_batch_size"],
        heal=heal_options(options),
        device=device_option(options["device"]),
        freeze_costly=None if options["freeze_costly"] is None else options["freeze_costly"] / 100,
        attribution_samples=options["attribution_samples"],
        keep=tuple(options["keep"]),
        batch_inputs=parse_batch_inputs(options["batch_inputs"], len(input_shapes)),
    )
    result = convert_checkpoint(
        checkpoint,
        model_spec,
        parse_kwargs(kwargs),
        [parse_input_spec(s) for s in input_shapes],
        out_dir,
        context,
        convert_options,
        quiet=quiet,
        model_name=display_spec(model_spec),
    )
    if not quiet:
        click.echo(RENDERERS["text"]([result.report], color=sys.stdout.isatty()), nl=False)
    return result.report.exit_code(fail_on="never")
