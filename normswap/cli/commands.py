"""What the CLI commands do, on the typed options the CLI built (option parsing is in __init__.py)."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import click

from ..calibration import HealOptions, resolve_device
from ..config import Config, ModelEntry
from ..context import Context
from ..conversion import ConvertOptions
from ..errors import ConfigError
from ..files import refuse_overwriting, write_text_atomic
from ..fix import FixJob, SourceFixes, plan_fixes
from ..linter import LintOptions, lint
from ..loader import ModelOptions, example_inputs, load_model, parse_input_spec, parse_kwargs
from ..options import command_line
from ..pipeline import JobOptions, convert_checkpoint
from ..plan import Plan
from ..render import RENDERERS, TEXT_STYLES, render_statistics
from ..report import Commands, Report, model_definition, worst_exit_code
from ..source import relative_path, repo_root


@dataclass(frozen=True)
class LintRun:
    """Everything `normswap lint` was asked: the MODEL arguments, the models to lint (from them
    or from the configuration), the context (and which of its fields the command line gave, for
    the commands lint prints), and the lint options."""

    models: tuple[str, ...]
    entries: list[ModelEntry]
    context: Context
    context_given: frozenset[str]
    options: LintOptions
    config_path: os.PathLike | None = None


@dataclass(frozen=True)
class ConvertRun:
    """Everything `normswap convert` was asked."""

    checkpoint: str
    model: ModelEntry
    out_dir: str
    context: Context
    options: ConvertOptions
    job: JobOptions


def display_spec(spec: str) -> str:
    """The spec as shown in reports: a file path relative to the repository root, never absolute."""
    location, sep, attribute = spec.rpartition(":")
    if sep and (location.endswith(".py") or "/" in location):
        return f"{relative_path(os.path.abspath(location))}:{attribute}"
    return spec


def model_entries(models: Sequence[str], model: ModelOptions, config: Config) -> list[ModelEntry]:
    """The models to work on: from the command line, else from [tool.normswap]."""
    if models:
        if not model.input_shapes:
            raise ConfigError("--input-shape is required with a MODEL (e.g. --input-shape 2,3,224,224).")
        shapes = [parse_input_spec(s) for s in model.input_shapes]
        return [ModelEntry(spec, parse_kwargs(model.kwargs), shapes) for spec in models]
    if not config.models:
        raise ConfigError("No MODEL given and no 'models' in [tool.normswap] of the nearest pyproject.toml.")
    return config.models


def run_lint(run: LintRun) -> int:
    """`normswap lint` (and `--fix` / `--diff`); returns the exit code."""
    options = run.options
    if options.plan_path and len(run.entries) != 1:
        raise ConfigError(f"--plan fits one model; {len(run.entries)} are being linted (name one MODEL).")
    reports: list[Report] = []
    jobs: list[FixJob] = []
    with model_code():
        for entry in run.entries:
            report, job = _lint_one(entry, run)
            reports.append(report)
            jobs.append(job)
    fixes = plan_fixes(jobs, repo_root(), unsafe=options.unsafe_fixes)
    if options.diff:
        return _print_diff(fixes)
    if options.fix:
        fixes.apply()
    for report in reports:
        if report.lint is not None:
            report.lint.fixes = fixes.for_model(report.model)
    code = worst_exit_code(reports, options.fail_on)
    if options.statistics:
        rendered = render_statistics(reports, options.output_format)
    elif options.output_format in TEXT_STYLES:
        color = options.output is None and sys.stdout.isatty()
        rendered = RENDERERS["text"](reports, color=color, style=TEXT_STYLES[options.output_format])
    else:
        rendered = RENDERERS[options.output_format](reports)
    if options.output:
        refuse_overwriting(options.output, [run.config_path, *_model_files(run.entries)])
        write_text_atomic(options.output, rendered)
    else:
        click.echo(rendered, nl=False)
    return code


def _lint_one(entry: ModelEntry, run: LintRun) -> tuple[Report, FixJob]:
    """Lint one model; its report, with the lint section the CLI completes, and its source-fix job."""
    options = run.options
    model, factory = load_model(entry.spec, entry.kwargs)
    name = display_spec(entry.spec)
    report = lint(
        model,
        example_inputs(entry.input_shapes),
        run.context,
        select=options.select,
        ignore=options.ignore,
        name=name,
        plan=Plan.read(options.plan_path) if options.plan_path else None,
        keep=options.keep,
        to=options.to,
        planned_by=options.plan_path,
        commands=_commands(entry, run),
    )
    report.model_location = model_definition(factory) or report.model_location
    if report.lint is None:
        raise TypeError("lint() returned a report without its lint section")
    only = {f.site.name for f in report.findings if f.site is not None} if (options.select or options.ignore) else None
    return report, FixJob(model, report.sites, report.lint.plan, label=name, only=only)


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


def _commands(entry: ModelEntry, run: LintRun) -> Commands:
    """The commands that act on what lint found: convert the checkpoint, fix the source."""
    options = run.options
    model = [f"-k {k}={v!r}" for k, v in entry.kwargs.items()] + [
        f"--input-shape {shape}" for shape in entry.input_shapes
    ]
    context = command_line(run.context, run.context_given)
    # the plan decides every site: the checkpoint must be converted with the plan the source is fixed to
    keep = (
        [f"--plan {shlex.quote(options.plan_path)}"]
        if options.plan_path
        else [*([f"--to {options.to}"] if options.to != "auto" else []), *(f"--keep {layer}" for layer in options.keep)]
    )
    convert = " ".join(
        ["normswap convert CHECKPOINT --model", shlex.quote(entry.spec), *model, *context, *keep, "--out converted/"]
    )
    lint_args = [shlex.quote(entry.spec), *model] if run.models else []
    fix = " ".join(["normswap lint", *lint_args, *context, *keep, "--fix", "--unsafe-fixes"])
    return Commands(convert=convert, fix=fix)


def _print_diff(fixes: SourceFixes) -> int:
    """`--diff`: the pending edits as a unified diff on stdout, a summary on stderr; 1 when any."""
    diff = fixes.diff()
    click.echo(diff, nl=False)
    held = len(fixes.held_back)
    summary = f"normswap: {len(fixes.selected)} fix(es) pending" + (
        f", {held} unsafe held back (--unsafe-fixes)" if held else ""
    )
    if fixes.unfixable:
        summary += f"; {len(fixes.unfixable)} site(s) not fixable in source (see `normswap lint`)"
    click.echo(summary, err=True)
    for note in fixes.notes if diff else ():
        click.echo(f"note: {note}", err=True)
    return 1 if diff else 0


def heal_options(given: dict[str, object], heal_flag: bool) -> HealOptions | None:
    """HealOptions from the healing options given (None without --heal or a --heal-* value); a
    value it refuses is a usage error (exit 2)."""
    if not heal_flag and not given:
        return None
    try:
        return HealOptions(**given)  # type: ignore[arg-type]  # checked by HealOptions itself
    except ValueError as exc:
        raise ConfigError(f"Invalid healing option: {exc}") from None


def check_device(name: object) -> None:
    """--device checked against this machine (a GPU asked for where there is none: exit 2)."""
    try:
        resolve_device(name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"--device {name}: {exc}") from None


def check_convert_run(run: ConvertRun) -> None:
    """What can be refused before any work: healing without data, input indices, opset, device.

    Raises:
        ConfigError / ExportError: naming the option.
    """
    if run.options.heal is not None and not run.job.calibration_data:
        raise ConfigError("Healing needs unlabeled inputs: pass --calibration-data FILE with --heal.")
    count = len(run.model.input_shapes)
    wrong = [i for i in run.job.batch_inputs or () if not 0 <= i < count]
    if wrong:
        spec = ",".join(map(str, run.job.batch_inputs or ()))
        raise ConfigError(
            f"--batch-inputs {spec} names no input: there are {count} --input-shape input(s), numbered from 0."
        )
    if run.job.opset is not None:
        from ..export import check_opset

        check_opset(run.job.opset)
    check_device(run.options.device)


def run_convert(run: ConvertRun) -> int:
    """`normswap convert`; returns the exit code."""
    check_convert_run(run)
    if run.job.trust_checkpoint:
        click.echo(
            f"normswap: warning: --trust-checkpoint: '{run.checkpoint}' may run code while it is loaded; use it only for files you trust",
            err=True,
        )
    with model_code():
        result = convert_checkpoint(
            run.checkpoint,
            run.model,
            run.out_dir,
            run.context,
            run.options,
            run.job,
            model_name=display_spec(run.model.spec),
        )
    if not run.job.quiet:
        click.echo(RENDERERS["text"]([result.report], color=sys.stdout.isatty()), nl=False)
    return result.report.exit_code(fail_on="never")
