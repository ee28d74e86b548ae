"""The `normswap` command line: lint, convert, rules, explain (option parsing; the work is in commands.py)."""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from typing import Any

import click

from .._version import __version__
from ..calibration import HealOptions
from ..context import Context
from ..conversion import ConvertOptions
from ..errors import ConfigError, NormswapError
from ..linter import LintOptions
from ..loader import ModelOptions
from ..options import given_on_command_line
from ..outputs import Interrupted
from ..pipeline import JobOptions
from .params import given_options, options_of

EXIT_INTERNAL = 3


def handle_errors(command: Callable[..., int]) -> Callable[..., None]:
    """Exit with the command's code; one sentence and exit 2 for input errors, exit 3 for bugs;
    a traceback only with --debug. The one place where the process exit code is set."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> None:
        context = click.get_current_context()
        try:
            code = command(*args, **kwargs)
        except SystemExit as exc:  # click exits with click.exceptions.Exit: this came from the user's code
            if debug:
                raise
            click.echo(
                f"normswap: error: the model's code called sys.exit({exc.code!r}) while normswap imported, built or ran it; "
                "a model module must not exit the process.",
                err=True,
            )
            context.exit(2)
        except NormswapError as exc:
            if debug:
                raise
            click.echo(f"normswap: error: {exc}", err=True)
            context.exit(exc.exit_code)
        except (KeyboardInterrupt, Interrupted) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            click.echo(f"normswap: {signal.Signals(signum).name}: stopped; nothing was written", err=True)
            context.exit(128 + signum)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:  # the CLI boundary: any bug becomes exit 3 with one line
            if debug:
                raise
            click.echo(
                f"normswap: error: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                err=True,
            )
            context.exit(EXIT_INTERNAL)
        context.exit(code)

    return click.option("--debug", is_flag=True, help="Show tracebacks.")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="normswap")
def main() -> None:
    """Find BatchNorm in PyTorch models, judge it, and rewrite it to GroupNorm / LayerNorm / frozen BN.

    \b
    Examples:
      normswap lint mypkg.models:resnet50 --input-shape 2,3,224,224 --batch-size 2
      normswap convert ckpt.pt --model mypkg.models:resnet50 --input-shape 1,3,224,224 --out converted/
      normswap explain NS101
    """


@main.command()
@click.argument("models", nargs=-1, metavar="[MODEL]...")
@options_of(ModelOptions, Context, LintOptions)
@handle_errors
def lint(models: tuple[str, ...], **values: Any) -> int:
    """Report where BatchNorm will hurt the way MODEL is trained or served, and fix the source.

    MODEL is `package.module:callable` or `path/to/file.py:callable`. Without MODEL, lints the
    models listed in [tool.normswap] of the nearest pyproject.toml. Exit codes: 0 clean,
    1 findings at or above --fail-on (not counting those --fix fixed) or, with --diff, a fix
    pending, 2 usage or input error, 3 internal error.

    \b
    Examples:
      normswap lint mypkg.nets:build --input-shape 2,3,224,224 --batch-size 2 --world-size 8
      normswap lint models.py:Net -k width=64 --input-shape 8,3,32,32 --format sarif -o normswap.sarif
      normswap lint models.py:Net --input-shape 8,3,32,32 --batch-size 2 --diff --unsafe-fixes
      normswap lint models.py:Net --input-shape 8,3,32,32 --batch-size 2 --fix --unsafe-fixes
      normswap lint            # the models in [tool.normswap]
    """
    from ..config import load_config
    from .commands import LintRun, model_entries, run_lint

    given = given_options()
    config = load_config()
    model = ModelOptions(**given_on_command_line(ModelOptions, values, given))
    run = LintRun(
        models=models,
        entries=model_entries(models, model, config),
        context=config.make_context(values, given),
        context_given=frozenset(given_on_command_line(Context, values, given)),
        options=config.make_lint_options(values, given),
        config_path=config.path,
    )
    return run_lint(run)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=True))
@click.option(
    "--model",
    "model_spec",
    required=True,
    metavar="MODEL",
    help="`package.module:callable` or `path/to/file.py:callable` that builds the model.",
)
@options_of(ModelOptions)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(),
    help="Output directory (weights, plan.json, model.onnx, report.json, report.md).",
)
@options_of(ConvertOptions, HealOptions, Context, JobOptions)
@handle_errors
def convert(checkpoint: str, model_spec: str, out_dir: str, **values: Any) -> int:
    """Rewrite the BatchNorm of a trained CHECKPOINT and write weights, plan, ONNX and report.

    Loads CHECKPOINT (state_dict .pt/.pth/.ckpt, nested or prefixed, or .safetensors; never
    running code from it unless --trust-checkpoint) into MODEL, converts, exports to ONNX and
    validates the export with onnxruntime. Exit codes: 0 converted and validated, 1 validation
    failed (outputs kept, report marked failed), 2 usage or input error, 3 internal error.

    \b
    Examples:
      normswap convert resnet.pt --model mypkg.nets:resnet50 --input-shape 1,3,224,224 --out converted/
      normswap convert ckpt.safetensors --model nets.py:Net --input-shape 8,3,32,32 --out out/ --to groupnorm --groups 16
      normswap convert ckpt.pt --model nets.py:Net --input-shape 8,3,32,32 --out out/ --calibration-data calib.pt --heal-steps 200
    """
    from ..config import ModelEntry, load_config
    from ..loader import parse_input_spec, parse_kwargs
    from .commands import ConvertRun, heal_options, run_convert

    given = given_options()
    model = ModelOptions(**given_on_command_line(ModelOptions, values, given))
    if not model.input_shapes:
        raise ConfigError("--input-shape is required (e.g. --input-shape 1,3,224,224).")
    settings = given_on_command_line(ConvertOptions, values, given)
    settings["heal"] = heal_options(given_on_command_line(HealOptions, values, given), heal_flag="heal" in settings)
    run = ConvertRun(
        checkpoint=checkpoint,
        model=ModelEntry(model_spec, parse_kwargs(model.kwargs), [parse_input_spec(s) for s in model.input_shapes]),
        out_dir=out_dir,
        context=load_config().make_context(values, given),
        options=ConvertOptions(**settings),
        job=JobOptions(**given_on_command_line(JobOptions, values, given)),
    )
    return run_convert(run)


@main.command()
def rules() -> None:
    """List the rule catalogue: code, name, default severity, fix safety and whether `lint --fix`
    can write the fix into the source (sometimes / never).

    \b
    Examples:
      normswap rules
    """
    from ..render.common import fix_availability
    from ..rules import CATALOGUE

    for rule in CATALOGUE:
        click.echo(f"{rule.code}  {rule.name:<28} {rule.severity.value:<8} {fix_availability(rule):<32} {rule.summary}")


@main.command()
@click.argument("code")
@handle_errors
def explain(code: str) -> int:
    """Print a rule's documentation.

    \b
    Examples:
      normswap explain NS101
    """
    from ..rules import CATALOGUE

    rule = next((r for r in CATALOGUE if r.code == code.upper() or r.name == code.lower()), None)
    if rule is None:
        raise ConfigError(f"Unknown rule '{code}'; `normswap rules` lists the codes.")
    from ..render.common import fix_availability

    click.echo(f"{rule.code} {rule.name} ({rule.severity.value}; {fix_availability(rule)})\n")
    click.echo(rule.documentation())
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
