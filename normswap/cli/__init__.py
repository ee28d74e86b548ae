"""The `normswap` command line: lint, convert, rules, explain (option parsing; the work is in commands.py)."""

from __future__ import annotations

import functools
import math
import signal
from collections.abc import Callable
from typing import Any

import click

from .. import targets
from .._version import __version__
from ..errors import ConfigError, NormswapError
from ..outputs import Interrupted

EXIT_INTERNAL = 3
FORMATS = ["text", "grouped", "full", "concise", "json", "markdown", "sarif"]  # commands.FORMATS, without importing torch


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (a nan passes every comparison)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


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
            click.echo(f"normswap: error: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            context.exit(EXIT_INTERNAL)
        context.exit(code)

    return click.option("--debug", is_flag=True, help="Show tracebacks.")(wrapper)


# --- options shared by lint and convert -----------------------------------------------------


def model_options(command: Callable) -> Callable:
    for decorator in reversed(
        [
            click.option("-k", "kwargs", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the model callable (Python literal)."),
            click.option(
                "--input-shape",
                "input_shapes",
                multiple=True,
                metavar="N,C,...",
                help="Shape of one example input, batch first, optionally with a dtype (8,128:int64); repeat for several inputs.",
            ),
        ]
    ):
        command = decorator(command)
    return command


def context_options(command: Callable) -> Callable:
    for decorator in reversed(
        [
            click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Training batch size per device."),
            click.option("--world-size", type=click.IntRange(min=1), default=None, help="Number of data-parallel devices."),
            click.option("--dp", "differential_privacy", is_flag=True, default=None, help="Trained with differential privacy (DP-SGD)."),
            click.option("--inference", "inference_only", is_flag=True, default=None, help="Inference only: never trained again."),
            click.option("--finetune", is_flag=True, default=None, help="Fine-tuned from a pretrained checkpoint."),
            click.option("--sequence", is_flag=True, default=None, help="Inputs are sequences."),
        ]
    ):
        command = decorator(command)
    return command


def context_flags(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("batch_size", "world_size", "differential_privacy", "inference_only", "finetune", "sequence")
    return {k: options.pop(k) for k in keys}


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
@model_options
@context_options
@click.option(
    "--format",
    "output_format",
    type=click.Choice(FORMATS),
    default=None,
    help="Report format (default: text, a table that groups per rule beyond 10 findings): "
    "grouped (per rule: count, layers, worst example), full (each finding with its line and fix), concise (one line each), "
    "json, markdown (with suggestion blocks), sarif (with fixes).",
)
@click.option("--statistics", is_flag=True, help="Print the number of findings per rule instead of the findings.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write the report to FILE (atomically) instead of stdout.")
@click.option(
    "--fail-on",
    type=click.Choice(["error", "warning", "info", "never"]),
    default=None,
    help="Exit 1 when findings reach this severity (default: error).",
)
@click.option("--select", multiple=True, metavar="CODE", help="Only these rule codes or prefixes (repeatable, or comma-separated).")
@click.option("--ignore", multiple=True, metavar="CODE", help="Skip these rule codes or prefixes.")
@click.option(
    "--fix", is_flag=True, help="Rewrite the model's source to build what `convert --to auto` produces; safe fixes only (frozen keeps the function)."
)
@click.option(
    "--unsafe-fixes", is_flag=True, help="Also apply (with --fix) or show (with --diff) the fixes that change the function: groupnorm, layernorm."
)
@click.option("--diff", is_flag=True, help="Print the fixes as a unified diff and write nothing; exit 1 when a fix is pending.")
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Fix the source to this plan.json (e.g. convert's) instead of auto's.",
)
@click.option("--keep", multiple=True, metavar="LAYER", help="Leave this BatchNorm site as it is in the fixes and the recommendation (repeatable).")
@handle_errors
def lint(models: tuple[str, ...], **options: Any) -> int:
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
    from .commands import run_lint

    flags = context_flags(options)
    return run_lint(models, flags, options)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=True))
@click.option(
    "--model", "model_spec", required=True, metavar="MODEL", help="`package.module:callable` or `path/to/file.py:callable` that builds the model."
)
@model_options
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Output directory (weights, plan.json, model.onnx, report.json, report.md).")
@click.option(
    "--to",
    type=click.Choice(targets.CHOICES),
    default="auto",
    show_default=True,
    help="Replacement target: auto (per site, from the findings), "
    + "; ".join(f"{t.name}: {t.summary}" for t in targets.REGISTRY if t.name != "keep")
    + ".",
)
@click.option(
    "--groups", "max_groups", type=click.IntRange(min=1), default=targets.DEFAULT_MAX_GROUPS, show_default=True, help="Largest GroupNorm group count."
)
@click.option(
    "--channels-per-group",
    type=click.IntRange(min=1),
    default=targets.DEFAULT_CHANNELS_PER_GROUP,
    show_default=True,
    help="Fewest channels in a GroupNorm group (1 allows InstanceNorm, which loses each sample's channel intensities).",
)
@click.option("--keep", multiple=True, metavar="LAYER", help="Leave this BatchNorm site as it is (repeatable); it keeps its batch statistics.")
@click.option(
    "--plan", "plan_path", type=click.Path(exists=True, dir_okay=False), default=None, help="Re-apply this saved plan.json instead of planning."
)
@context_options
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export (and its validation).")
@click.option("--no-validate", is_flag=True, help="Export but do not validate with onnxruntime.")
@click.option(
    "--atol",
    type=FiniteFloat(min=0),
    default=None,
    help="Absolute tolerance of the ONNX check (default: per output, 16x the model's own float64 rounding error, at least 16 ulps of its dtype at its scale).",
)
@click.option("--rtol", type=FiniteFloat(min=0), default=None, help="Relative tolerance of the ONNX check (default: 16 ulps of each output's dtype).")
@click.option(
    "--batch-inputs",
    default=None,
    metavar="I,J|none",
    help="Which inputs (0-based, in --input-shape order) have the batch in dimension 0; 'none' when no input does (default: those whose dimension 0 matches the first input's).",
)
@click.option("--opset", type=click.IntRange(min=14), default=None, help="ONNX opset (default 18).")
@click.option(
    "--calibration-data",
    type=click.Path(),
    default=None,
    help="Unlabeled inputs (.pt/.npz/.safetensors, first axis = samples) to calibrate the new layers.",
)
@click.option("--calibration-batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size for calibration and healing.")
@click.option("--heal", is_flag=True, help="After calibration, distil the converted model toward the original (the measured defaults).")
@click.option(
    "--heal-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Healing steps (implies --heal; default: 80 passes over the training batches, 200 to 2000).",
)
@click.option(
    "--heal-lr", type=FiniteFloat(min=0, min_open=True), default=None, help="Healing learning rate (implies --heal; default 1e-3, cosine decay)."
)
@click.option("--heal-params", type=click.Choice(["all", "norm"]), default=None, help="Parameters healing trains (implies --heal; default: all).")
@click.option(
    "--freeze-costly",
    type=FiniteFloat(min=0, max=100, max_open=True),
    default=None,
    metavar="PCT",
    help="With --to auto and --calibration-data: freeze each site whose conversion alone, calibrated, costs more than PCT points of top-1 agreement.",
)
@click.option(
    "--attribution-samples",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Calibration inputs used to measure what each site costs alone (0: not measured).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where calibration, healing and validation run (auto: this process's GPU when there is one, under torchrun its local GPU).",
)
@click.option("--trust-checkpoint", is_flag=True, help="Allow a checkpoint that runs code when loaded (a pickled module). Only for files you trust.")
@click.option("--force", is_flag=True, help="Replace normswap's outputs in an existing, non-empty --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress or summary, only errors.")
@handle_errors
def convert(
    checkpoint: str, model_spec: str, kwargs: tuple[str, ...], input_shapes: tuple[str, ...], out_dir: str, quiet: bool, **options: Any
) -> int:
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
    from .commands import run_convert

    return run_convert(checkpoint, model_spec, kwargs, input_shapes, out_dir, quiet, context_flags(options), options)


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
