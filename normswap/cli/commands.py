"""What the CLI commands do, separated from option parsing."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import click

from ..calibration import HealOptions, resolve_device
from ..config import Config, ModelEntry, load_config
from ..errors import ConfigError
from ..files import refuse_overwriting, write_text_atomic
from ..linter import lint
from ..loader import example_inputs, load_model, parse_input_spec, parse_kwargs
from ..plan import Plan
from ..policy import make_plan
from ..render import RENDERERS, render_statistics
from ..report import Report, model_definition, worst_exit_code
from ..source import relative_path, repo_root


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


def run_lint(models: Sequence[str], flags: dict[str, Any], options: dict[str, Any]) -> int:
    """`normswap lint` (and `--fix` / `--diff`); returns the exit code."""
    from ..fix import plan_fixes

    config = load_config()
    context = config.make_context(**flags)
    output_format = options["output_format"] or config.format or "text"
    if output_format not in FORMATS:
        raise ConfigError(f"Unknown format '{output_format}'; use one of {', '.join(FORMATS)}.")
    if options["diff"] and options["fix"]:
        raise ConfigError("--diff shows the fixes without writing them; use it without --fix.")
    if options["statistics"] and output_format in ("markdown", "sarif"):
        raise ConfigError(f"--statistics prints counts as text or json, not {output_format}.")
    fail_on = options["fail_on"] or config.fail_on or "error"
    select = _split_codes(options["select"]) or config.select
    ignore = _split_codes(options["ignore"]) or config.ignore
    entries = model_entries(models, options["kwargs"], options["input_shapes"], config)
    if options["plan_path"] and len(entries) != 1:
        raise ConfigError(f"--plan fits one model; {len(entries)} are being linted (name one MODEL).")
    reports: list[Report] = []
    jobs: list = []
    with model_code():
        for entry in entries:
            reports.append(_lint_one(entry, models, context, select, ignore, flags, options, jobs))
    fixes = plan_fixes(jobs, repo_root(), unsafe=options["unsafe_fixes"])
    if options["diff"]:
        return _print_diff(fixes)
    if options["fix"]:
        fixes.apply()
    for report in reports:
        report.fixes = fixes.for_model(report.model)
    code = worst_exit_code(reports, fail_on)  # validates fail_on before anything is written
    if options["statistics"]:
        rendered = render_statistics(reports, output_format)
    elif output_format in TEXT_STYLES:
        color = options["output"] is None and sys.stdout.isatty()
        rendered = RENDERERS["text"](reports, color=color, style=TEXT_STYLES[output_format])
    else:
        rendered = RENDERERS[output_format](reports)
    if options["output"]:
        refuse_overwriting(options["output"], [config.path, *_model_files(entries)])
        write_text_atomic(options["output"], rendered)
    else:
        click.echo(rendered, nl=False)
    return code


def _lint_one(entry: ModelEntry, models: Sequence[str], context: Any, select, ignore, flags, options, jobs: list) -> Report:
    """Lint one model and queue its source fixes."""
    from ..fix import FixJob

    model, factory = load_model(entry.spec, entry.kwargs)
    name = display_spec(entry.spec)
    report = lint(model, example_inputs(entry.input_shapes), context, select=select, ignore=ignore, name=name)
    report.model_location = model_definition(factory) or report.model_location
    plan = _fix_plan(report, context, options)
    report.auto_plan = {target: n for target, n in plan.counts().items() if target != "keep"}
    report.planned_by = options["plan_path"] or "auto"
    report.commands = _commands(entry, models, flags, options)
    only = {f.site.name for f in report.findings if f.site is not None} if (select or ignore) else None
    jobs.append(FixJob(model, report.sites, plan, label=name, only=only))
    return report


def _model_files(entries: Sequence[ModelEntry]) -> list[str]:
    """The source files of the models (a report must never replace one)."""
    found = []
    for entry in entries:
        location = entry.spec.rpartition(":")[0]
        if location.endswith(".py"):
            found.append(location)
        else:
            module = sys.modules.get(location)
            path = getattr(module, "__file__", None)
            if path:
                found.append(path)
    return found


@contextlib.contextmanager
def model_code() -> Iterator[None]:
    """While the user's model is imported, built and run: its prints go to stderr, so that a
    report on stdout (json, sarif) stays valid."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


TEXT_STYLES = {"text": "auto", "grouped": "grouped", "full": "full", "concise": "concise"}
FORMATS = (*TEXT_STYLES, "json", "markdown", "sarif")


def _fix_plan(report: Report, context: Any, options: dict[str, Any]) -> Plan:
    """The plan the source fixes follow: --plan, else what `convert --to auto` would do (with --keep)."""
    if options["plan_path"]:
        plan = Plan.read(options["plan_path"])
        plan.check(report.sites)
        return plan
    return make_plan(report.sites, report.findings, context, "auto", keep_sites=tuple(options["keep"]), strict=False)


def _commands(entry: ModelEntry, models: Sequence[str], flags: dict[str, Any], options: dict[str, Any]) -> dict[str, str]:
    """The commands that act on what lint found: convert the checkpoint, fix the source."""
    model = [f"-k {k}={v!r}" for k, v in entry.kwargs.items()] + [f"--input-shape {shape}" for shape in entry.input_shapes]
    context = [f"--{name.replace('_', '-')} {value}" for name, value in flags.items() if name in ("batch_size", "world_size") and value]
    context += [f"--{FLAG_NAMES[name]}" for name, value in flags.items() if name in FLAG_NAMES and value]
    # the plan decides every site: the checkpoint must be converted with the plan the source is fixed to
    keep = [f"--plan {shlex.quote(options['plan_path'])}"] if options["plan_path"] else [f"--keep {layer}" for layer in options["keep"]]
    convert = " ".join(["normswap convert CHECKPOINT --model", shlex.quote(entry.spec), *model, *context, *keep, "--out converted/"])
    lint_args = [shlex.quote(entry.spec), *model] if models else []
    fix = " ".join(["normswap lint", *lint_args, *context, *keep, "--fix", "--unsafe-fixes"])
    return {"convert": convert, "fix": fix}


FLAG_NAMES = {"differential_privacy": "dp", "inference_only": "inference", "finetune": "finetune", "sequence": "sequence"}


def _print_diff(fixes: Any) -> int:
    """`--diff`: the pending edits as a unified diff on stdout, a summary on stderr; 1 when any."""
    diff = fixes.diff()
    click.echo(diff, nl=False)
    held = len(fixes.held_back)
    summary = f"normswap: {len(fixes.selected)} fix(es) pending" + (f", {held} unsafe held back (--unsafe-fixes)" if held else "")
    if fixes.unfixable:
        summary += f"; {len(fixes.unfixable)} site(s) not fixable in source (see `normswap lint`)"
    click.echo(summary, err=True)
    for note in fixes.notes if diff else ():
        click.echo(f"note: {note}", err=True)
    return 1 if diff else 0


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
    if options["opset"] is not None:
        from ..export import check_opset

        check_opset(options["opset"])  # before any work
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
    with model_code():
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
