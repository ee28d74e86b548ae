"""convert_checkpoint(): the whole `normswap convert` job, staged so that no partial output remains."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from .calibration import HealOptions, batches_from_tensor, check_model_accepts, load_calibration_tensor
from .calibration.attribution import DEFAULT_SAMPLES
from .checkpoint import Checkpoint, finite_state_dict, fit_to_model, load_checkpoint, save_weights
from .context import Context
from .conversion import convert
from .errors import PlanError
from .export import export_onnx, validate_onnx
from .files import write_text_atomic
from .loader import check_input_memory, example_inputs, load_model, model_importable
from .outputs import MANIFEST, check_output_dir, manifest_of, output_set, verified_outputs
from .plan import Plan
from .render.plot import plot_attribution, plot_available
from .report import Report, model_definition
from .rewrite import Conversion, apply_plan
from .targets import DEFAULT_CHANNELS_PER_GROUP, DEFAULT_MAX_GROUPS


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

    The outputs form one set (see normswap/outputs.py): staged beside `out_dir`, which is locked
    for the run, and moved in at the end with a manifest, so a failure or a signal leaves nothing
    behind and nothing mixed. A failed validation still writes the outputs (marked failed).
    """
    options = options or ConvertOptions()
    context = context or Context()
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    given = [checkpoint_path, *(Path(p) for p in (options.plan_path, options.calibration_data) if p)]
    check_output_dir(out_dir, given, options.force)
    check_input_memory(input_shapes)
    steps = Steps(quiet)
    with output_set(out_dir, options.force) as staging:
        with steps.step("load"):
            model, factory = load_model(model_spec, model_kwargs)
            with model_importable(model_spec):  # a trusted pickled module names its class by the model's module
                checkpoint = load_checkpoint(checkpoint_path, trust=options.trust_checkpoint)
            model.load_state_dict(fit_to_model(checkpoint, model), strict=False)
            model.eval()
            inputs = example_inputs(input_shapes, seed=options.seed)
            plan = Plan.read(options.plan_path) if options.plan_path else None
        stage = "trace, plan and rewrite" + (", calibrate and heal" if options.calibration_data else "")
        with steps.step(stage):
            batches = _calibration_batches(model, options.calibration_data, options.calibration_batch_size) if options.calibration_data else None
            conversion = convert(
                model,
                inputs,
                to=options.to,
                context=context,
                max_groups=options.max_groups,
                channels_per_group=options.channels_per_group,
                plan=plan,
                keep=options.keep,
                calibration_data=batches,
                heal=options.heal,
                device=options.device,
                freeze_costly=options.freeze_costly,
                attribution_samples=options.attribution_samples,
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
            calibration=[fit.to_dict() for fit in conversion.calibration],
            attribution=[cost.to_dict() for cost in conversion.attribution],
            healing=conversion.healing.to_dict() if conversion.healing is not None else None,
            drift=dict(conversion.drift),
            notes=list(conversion.notes),
        )
        if options.trust_checkpoint:
            report.notes.append(f"the checkpoint '{checkpoint_path}' was loaded with --trust-checkpoint: code in it was allowed to run")
        _write_outputs(staging, out_dir, report, conversion, model, inputs, checkpoint.weights_name, options, steps)
    return ConvertResult(report, conversion, out_dir, steps.timings)


def _write_outputs(
    staging: Path,
    out_dir: Path,
    report: Report,
    conversion: Conversion,
    model: torch.nn.Module,
    inputs: tuple,
    weights_name: str,
    options: ConvertOptions,
    steps: Steps,
) -> None:
    """Weights, plan, chart, ONNX (validated), then the reports with the manifest, in `staging`."""
    with steps.step("write weights and plan"):
        save_weights(finite_state_dict(conversion.model), staging / weights_name)
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
        if (staging / "model.onnx.data").exists():
            report.outputs["onnx_data"] = str(out_dir / "model.onnx.data")
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
    report.outputs.update({"report": str(out_dir / MANIFEST), "markdown": str(out_dir / "report.md")})
    write_text_atomic(staging / "report.md", report.to_markdown())
    report.manifest = manifest_of(staging)
    write_text_atomic(staging / MANIFEST, report.to_json())


def _calibration_batches(model: torch.nn.Module, path: str, batch_size: int) -> list[torch.Tensor]:
    """The calibration file in batches, checked to fit the model before anything else runs."""
    batches = batches_from_tensor(load_calibration_tensor(path), batch_size)
    check_model_accepts(model, [(batches[0],)], source=path)
    return batches


def load_converted(model: torch.nn.Module, out_dir: str | Path, example_inputs: Any = None) -> torch.nn.Module:
    """Apply `out_dir/plan.json` to a fresh `model` and load the converted weights into it.

    The directory must match its manifest (report.json): a file changed since the run, missing, or
    left from another run is refused.

    Returns the converted model (an fx.GraphModule when functional sites were rewritten).
    """
    out_dir = Path(out_dir)
    files = verified_outputs(out_dir)
    if "plan.json" not in files:
        raise PlanError(f"'{out_dir}' has no plan.json; point to a directory written by `normswap convert`.")
    plan = Plan.read(files["plan.json"])
    weights = next((files[n] for n in ("model.safetensors", "model.pt") if n in files), None)
    if weights is None:
        raise PlanError(f"'{out_dir}' has no model.safetensors or model.pt.")
    converted = apply_plan(model, plan, example_inputs=example_inputs)
    checkpoint = Checkpoint(weights, load_checkpoint(weights).state_dict, "torch")
    converted.load_state_dict(fit_to_model(checkpoint, converted), strict=False)
    return converted
