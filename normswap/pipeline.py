"""convert_checkpoint(): the whole `normswap convert` job, staged so that no partial output remains."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from .calibration import HealOptions, batches_from_tensor, calibrate_and_heal, load_calibration_tensor
from .calibration.attribution import DEFAULT_SAMPLES
from .checkpoint import Checkpoint, fit_to_model, load_checkpoint, save_weights
from .context import Context
from .conversion import convert
from .errors import CalibrationError, OutputError, PlanError
from .export import export_onnx, validate_onnx
from .files import write_text_atomic
from .loader import example_inputs, load_model
from .plan import Plan
from .render.plot import plot_attribution, plot_available
from .report import Report, model_definition
from .rewrite import Conversion, apply_plan
from .targets import DEFAULT_CHANNELS_PER_GROUP, DEFAULT_MAX_GROUPS
from .torchutil import preserved


@dataclass
class ConvertOptions:
    to: str = "auto"
    max_groups: int = DEFAULT_MAX_GROUPS
    channels_per_group: int = DEFAULT_CHANNELS_PER_GROUP
    plan_path: str | None = None
    onnx: bool = True
    validate: bool = True
    atol: float | None = None
    rtol: float | None = None
    opset: int | None = None
    trust_checkpoint: bool = False
    force: bool = False
    keep: tuple[str, ...] = ()
    batch_inputs: tuple[int, ...] | None = None  # None: detected
    calibration_data: str | None = None
    calibration_batch_size: int = 32
    heal: HealOptions | None = None  # None: calibrate only
    device: str = "auto"
    freeze_costly: float | None = None  # a fraction of top-1 agreement
    attribution_samples: int = DEFAULT_SAMPLES
    seed: int = 0


@dataclass
class ConvertResult:
    report: Report
    conversion: Conversion
    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)


log = logging.getLogger(__name__)


class Steps:
    """Progress for the steps of a job: a spinner on a terminal, nothing when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet or not self.console.is_terminal
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.quiet:
            yield
        else:
            with self.console.status(f"{name}..."):
                yield
            self.console.print(f"[green]✓[/green] {name} ({time.perf_counter() - start:.2f} s)")
        self.timings[name] = time.perf_counter() - start
        log.debug("%s took %.3f s", name, self.timings[name])


def check_output_dir(out_dir: Path, checkpoint_path: Path, force: bool) -> None:
    """Refuse outputs that would lose anything: a file in the way, existing files without --force,
    or an output that is the input checkpoint."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"Output path '{out_dir}' is a file; give a directory for --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputError(f"Output directory '{out_dir}' already has files; pass --force to replace normswap's outputs in it.")
    if checkpoint_path.resolve().parent == out_dir.resolve() and checkpoint_path.name in OUTPUT_NAMES:
        raise OutputError(f"Output directory '{out_dir}' would overwrite the input checkpoint '{checkpoint_path.name}'; choose another --out.")
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"Cannot create '{out_dir}': directory '{parent}' does not exist.")
    if not os.access(parent if not out_dir.exists() else out_dir, os.W_OK):
        raise OutputError(f"Output directory '{out_dir}' is not writable; choose another --out.")


OUTPUT_NAMES = ("model.safetensors", "model.pt", "plan.json", "model.onnx", "model.onnx.data", "report.json", "report.md", "attribution.png")


def convert_checkpoint(
    checkpoint_path: str | Path,
    model_spec: str,
    model_kwargs: dict[str, Any],
    input_shapes: Sequence[Any],
    out_dir: str | Path,
    context: Context | None = None,
    options: ConvertOptions | None = None,
    quiet: bool = True,
    model_name: str | None = None,
) -> ConvertResult:
    """Load weights into the user's model, convert, export, validate and write every output.

    Everything is written to a staging directory beside `out_dir` and moved in at the end, so a
    failure leaves no partial output. A failed validation still writes the outputs (marked failed).
    """
    options = options or ConvertOptions()
    context = context or Context()
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    check_output_dir(out_dir, checkpoint_path, options.force)
    steps = Steps(quiet)
    with steps.step("load"):
        model, factory = load_model(model_spec, model_kwargs)
        checkpoint = load_checkpoint(checkpoint_path, trust=options.trust_checkpoint)
        model.load_state_dict(fit_to_model(checkpoint, model), strict=False)
        model.eval()
        inputs = example_inputs(input_shapes, seed=options.seed)
        plan = Plan.from_json(_read_text(options.plan_path), where=options.plan_path) if options.plan_path else None
    with steps.step("trace, plan and rewrite"):
        conversion = convert(
            model,
            inputs,
            to=options.to,
            context=context,
            max_groups=options.max_groups,
            channels_per_group=options.channels_per_group,
            plan=plan,
            keep=options.keep,
        )
    report = Report(
        model=model_name or model_spec,
        capture_method=conversion.capture_method,
        context=context,
        sites=conversion.sites,
        findings=conversion.findings,
        fallback_reasons=conversion.analysis.capture.fallback_reasons,
        model_location=model_definition(factory),
        plan=conversion.plan,
        not_fired=conversion.analysis.skipped,
    )
    if options.calibration_data:
        with steps.step("calibrate and heal"):
            batches = _calibration_batches(model, options.calibration_data, options.calibration_batch_size)
            if options.freeze_costly is not None and options.to == "auto" and plan is None:
                conversion = convert(
                    model,
                    inputs,
                    context=context,
                    max_groups=options.max_groups,
                    channels_per_group=options.channels_per_group,
                    keep=options.keep,
                    calibration_data=batches,
                    heal=options.heal,
                    device=options.device,
                    freeze_costly=options.freeze_costly,
                    attribution_samples=options.attribution_samples,
                )
                report.plan = conversion.plan
            else:
                calibrate_and_heal(conversion, model, batches, options.heal, options.device, options.attribution_samples)
            report.calibration = [fit.to_dict() for fit in conversion.calibration]
            report.attribution = [cost.to_dict() for cost in conversion.attribution]
            report.drift.update(conversion.drift)
    with _staging(out_dir) as staging:
        weights_name = checkpoint.weights_name
        with steps.step("write weights and plan"):
            save_weights(conversion.model.state_dict(), staging / weights_name)
            write_text_atomic(staging / "plan.json", conversion.plan.to_json())
        report.outputs = {"weights": str(out_dir / weights_name), "plan": str(out_dir / "plan.json")}
        if report.attribution:
            if plot_available():
                plot_attribution(report.attribution, staging / "attribution.png", f"{report.model}: what each site costs on its own")
                report.outputs["plot"] = str(out_dir / "attribution.png")
            else:
                report.notes.append("no chart of the per-site cost: install the plot extra (pip install 'normswap[plot]') for attribution.png")
        if options.onnx:
            with steps.step("export ONNX"):
                onnx_path = export_onnx(conversion.model, inputs, staging / "model.onnx", opset=options.opset, batch_inputs=options.batch_inputs)
            report.outputs["onnx"] = str(out_dir / "model.onnx")
            if options.validate:
                with steps.step("validate with onnxruntime"):
                    report.validation = validate_onnx(
                        conversion.model,
                        onnx_path,
                        inputs,
                        original=model,
                        atol=options.atol,
                        rtol=options.rtol,
                        plan=conversion.plan,
                        batch_inputs=options.batch_inputs,
                        device=options.device,
                    )
                if report.validation.drift is not None and "swap" not in report.drift:
                    report.drift = {"swap": report.validation.drift, **report.drift}
        report.outputs.update({"report": str(out_dir / "report.json"), "markdown": str(out_dir / "report.md")})
        write_text_atomic(staging / "report.json", report.to_json())
        write_text_atomic(staging / "report.md", report.to_markdown())
    return ConvertResult(report, conversion, out_dir, steps.timings)


def _calibration_batches(model: torch.nn.Module, path: str, batch_size: int) -> list[torch.Tensor]:
    """The calibration file in batches, checked to fit the model before anything else runs."""
    batches = batches_from_tensor(load_calibration_tensor(path), batch_size)
    try:
        with preserved(model), torch.no_grad():
            model.eval()(batches[0])
    except Exception as exc:  # the user's model rejects the data: one sentence, with the cause
        raise CalibrationError(
            f"Calibration data '{path}' of shape {tuple(batches[0].shape)} (per batch) does not fit the model: {str(exc).splitlines()[0][:160]}."
        ) from exc
    return batches


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"Cannot read plan '{path}': {exc.strerror or exc}.") from exc


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir`; its files are moved into `out_dir` on success."""
    parent = out_dir.resolve().parent
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.normswap-", dir=parent))
    except OSError as exc:
        raise OutputError(f"Cannot write next to '{out_dir}': {exc.strerror}; choose a writable --out.") from exc
    try:
        yield staging
        out_dir.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            os.replace(item, out_dir / item.name)  # same filesystem: atomic per file
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_converted(model: torch.nn.Module, out_dir: str | Path, example_inputs: Any = None) -> torch.nn.Module:
    """Apply `out_dir/plan.json` to a fresh `model` and load the converted weights into it.

    Returns the converted model (an fx.GraphModule when functional sites were rewritten).
    """
    out_dir = Path(out_dir)
    plan_path = out_dir / "plan.json"
    if not plan_path.is_file():
        raise PlanError(f"'{out_dir}' has no plan.json; point to a directory written by `normswap convert`.")
    plan = Plan.from_json(plan_path.read_text(encoding="utf-8"), where=str(plan_path))
    weights = next((out_dir / n for n in ("model.safetensors", "model.pt") if (out_dir / n).is_file()), None)
    if weights is None:
        raise PlanError(f"'{out_dir}' has no model.safetensors or model.pt.")
    converted = apply_plan(model, plan, example_inputs=example_inputs)
    checkpoint = Checkpoint(weights, load_checkpoint(weights).state_dict, "torch")
    converted.load_state_dict(fit_to_model(checkpoint, converted), strict=False)
    return converted
