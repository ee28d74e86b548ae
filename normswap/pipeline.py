"""convert_checkpoint(): the whole `normswap convert` job, staged so that no partial output remains."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .calibration import check_model_accepts, load_calibration_tensor
from .calibration.data import TensorSamples
from .calibration.images import ImageFolder, ImagePreprocessing
from .checkpoint import Checkpoint, finite_state_dict, fit_to_model, load_checkpoint, save_weights
from .config import ModelEntry
from .context import Context
from .conversion import Conversion, ConvertOptions, convert_with
from .errors import ConfigError, PlanError
from .export import export_onnx_with_info, validate_onnx
from .files import write_text_atomic
from .loader import check_input_memory, example_inputs, load_model, model_importable
from .options import option
from .outputs import MANIFEST, check_output_dir, manifest_of, output_set, verified_outputs
from .plan import Plan
from .render.plot import plot_attribution, plot_available
from .report import ConversionSection, Report, conversion_report, model_definition
from .rewrite import apply_plan
from .terminal import silenced, stderr_console
from .torchutil import Timings


def _batch_inputs(spec: str) -> tuple[int, ...]:
    """`--batch-inputs`: "0,2", or "none" (no input carries the batch)."""
    if spec.strip().lower() == "none":
        return ()
    try:
        indices = tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--batch-inputs expects comma-separated input indices or 'none', got '{spec}'.") from None
    if not indices:
        raise ConfigError(f"--batch-inputs {spec} names no input; give input indices (from 0) or 'none'.")
    return indices


def _numbers(flag: str, count: tuple[int, ...]) -> Any:
    """A parser of comma-separated numbers for `flag`, `count` of them (any of those counts)."""

    def parse(spec: str) -> tuple[float, ...]:
        try:
            values = tuple(float(part) for part in spec.split(","))
        except ValueError:
            raise ConfigError(f"{flag} expects comma-separated numbers, got '{spec}'.") from None
        if len(values) not in count:
            raise ConfigError(f"{flag} expects {' or '.join(map(str, count))} numbers, got {len(values)} in '{spec}'.")
        return values

    return parse


def _image_size(spec: str) -> tuple[int, int]:
    """`--image-size`: "224" or "224,224" (height, width)."""
    values = _numbers("--image-size", (1, 2))(spec)
    if any(v < 1 or v != int(v) for v in values):
        raise ConfigError(f"--image-size expects positive whole numbers of pixels, got '{spec}'.")
    return (int(values[0]), int(values[-1]))


def _std(spec: str) -> tuple[float, ...]:
    values = _numbers("--image-std", (1, 3))(spec)
    if any(v <= 0 for v in values):
        raise ConfigError(f"--image-std expects positive numbers, got '{spec}'.")
    return values


@dataclass(frozen=True)
class JobOptions:
    """What one `normswap convert` run reads, writes and checks besides the conversion itself
    (every field is an option of the command)."""

    plan_path: str | None = option(
        None, "--plan", help="Re-apply this saved plan.json instead of planning.", path="existing-file"
    )
    onnx: bool = option(
        True, "--no-onnx", help="Skip the ONNX export (and its validation).", value_type=bool, negate=True
    )
    validate: bool = option(
        True, "--no-validate", help="Export but do not validate with onnxruntime.", value_type=bool, negate=True
    )
    atol: float | None = option(
        None,
        "--atol",
        help="Absolute tolerance of the ONNX check (default: per output, 16x the model's own float64 rounding error, at least 16 ulps "
        "of its dtype at its scale).",
        value_type=float,
        minimum=0,
        finite=True,
    )
    rtol: float | None = option(
        None,
        "--rtol",
        help="Relative tolerance of the ONNX check (default: 16 ulps of each output's dtype).",
        value_type=float,
        minimum=0,
        finite=True,
    )
    batch_inputs: tuple[int, ...] | None = option(  # None: detected
        None,
        "--batch-inputs",
        help="Which inputs (0-based, in --input-shape order) have the batch in dimension 0; 'none' when no input does (default: those "
        "whose dimension 0 matches the first input's).",
        metavar="I,J|none",
        parse=_batch_inputs,
    )
    opset: int | None = option(None, "--opset", help="ONNX opset (default 18).", value_type=int, minimum=14)
    calibration_data: str | None = option(
        None,
        "--calibration-data",
        help="Unlabeled inputs to calibrate (and heal) the new layers: a tensor file (.pt/.npy/.npz/.safetensors, first axis = "
        "samples) or a folder of images (read with --image-size/--image-mean/--image-std); streamed a batch at a time.",
        path="any",
    )
    image_size: tuple[int, int] | None = option(
        None,
        "--image-size",
        help="With a folder of images: resize the shorter side and crop the centre to this size (H or H,W; default: as they are).",
        metavar="H[,W]",
        parse=_image_size,
    )
    image_mean: tuple[float, ...] = option(
        (0.0, 0.0, 0.0),
        "--image-mean",
        help="With a folder of images: per-channel mean subtracted from pixels scaled to [0, 1] (R,G,B or one value for gray).",
        metavar="R,G,B",
        parse=_numbers("--image-mean", (1, 3)),
    )
    image_std: tuple[float, ...] = option(
        (1.0, 1.0, 1.0),
        "--image-std",
        help="With a folder of images: per-channel standard deviation the pixels are divided by, after the mean.",
        metavar="R,G,B",
        parse=_std,
    )
    calibration_batch_size: int = option(
        32,
        "--calibration-batch-size",
        help="Batch size for calibration and healing.",
        value_type=int,
        minimum=1,
        show_default=True,
    )
    checkpoint_prefix: str | None = option(
        None,
        "--checkpoint-prefix",
        help="Load the model stored under this key prefix of the checkpoint, one of several it holds "
        "(e.g. 'model.' in a distillation checkpoint that also holds 'teacher.').",
        metavar="PREFIX",
    )
    trust_checkpoint: bool = option(
        False,
        "--trust-checkpoint",
        help="Allow a checkpoint that runs code when loaded (a pickled module). Only for files you trust.",
        value_type=bool,
    )
    force: bool = option(
        False, "--force", help="Replace normswap's outputs in an existing, non-empty --out.", value_type=bool
    )
    quiet: bool = option(False, "--quiet", "-q", help="No progress or summary, only errors.", value_type=bool)
    seed: int = 0  # of the example inputs


log = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    report: Report
    conversion: Conversion
    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)


class Steps:
    """Progress for the steps of a job: a spinner on a terminal, nothing when quiet; each step timed."""

    def __init__(self, quiet: bool) -> None:
        self.console = stderr_console()  # the console healing's progress bar draws on too: it nests under the spinner
        self.quiet = quiet or not self.console.is_terminal
        self.timings = Timings()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        with self.timings.measure(name):
            if self.quiet:
                with silenced(self.console):  # --quiet holds for what the step draws itself (healing's bar)
                    yield
            else:
                with self.console.status(f"{name}..."):
                    yield
        if not self.quiet:
            self.console.print(f"[green]✓[/green] {name} ({self.timings.seconds[name]:.2f} s)")
        log.debug("%s took %.3f s", name, self.timings.seconds[name])


def convert_checkpoint(
    checkpoint_path: str | Path,
    model: ModelEntry,
    out_dir: str | Path,
    context: Context | None = None,
    options: ConvertOptions | None = None,
    job: JobOptions | None = None,
    model_name: str | None = None,
) -> ConvertResult:
    """Load weights into the user's model, convert, export, validate and write every output.

    The outputs form one set (see normswap/outputs.py): staged beside `out_dir`, which is locked
    for the run, and moved in at the end with a manifest, so a failure or a signal leaves nothing
    behind and nothing mixed. A failed validation still writes the outputs (marked failed).
    """
    options, job, context = options or ConvertOptions(), job or JobOptions(), context or Context()
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    given = [checkpoint_path, *(Path(p) for p in (job.plan_path, job.calibration_data) if p)]
    check_output_dir(out_dir, given, job.force)
    check_input_memory(model.input_shapes)
    steps = Steps(job.quiet)
    with output_set(out_dir, job.force) as staging:
        with steps.step("load"):
            module, factory = load_model(model.spec, model.kwargs)
            with model_importable(model.spec):  # a trusted pickled module names its class by the model's module
                checkpoint = load_checkpoint(checkpoint_path, trust=job.trust_checkpoint)
            module.load_state_dict(fit_to_model(checkpoint, module, job.checkpoint_prefix), strict=False)
            module.eval()
            inputs = example_inputs(model.input_shapes, seed=job.seed)
            plan = Plan.read(job.plan_path) if job.plan_path else None
        stage = "trace, plan and rewrite" + (", calibrate and heal" if job.calibration_data else "")
        with steps.step(stage):
            batches = _calibration_data(module, job) if job.calibration_data else None
            conversion = convert_with(module, inputs, context, options, plan=plan, calibration_data=batches)
        section = ConversionSection.of(conversion)
        report = conversion_report(model_name or model.spec, conversion, context, section, model_definition(factory))
        if job.trust_checkpoint:
            report.notes.append(
                f"the checkpoint '{checkpoint_path}' was loaded with --trust-checkpoint: code in it was allowed to run"
            )
        _write_outputs(
            staging, out_dir, report, section, conversion, module, inputs, checkpoint.weights_name, options, job, steps
        )
    return ConvertResult(report, conversion, out_dir, steps.timings.seconds)


def _write_outputs(
    staging: Path,
    out_dir: Path,
    report: Report,
    section: ConversionSection,
    conversion: Conversion,
    model: torch.nn.Module,
    inputs: tuple,
    weights_name: str,
    options: ConvertOptions,
    job: JobOptions,
    steps: Steps,
) -> None:
    """Weights, plan, chart, ONNX (validated), then the reports with the manifest, in `staging`
    (`section` is the report's conversion section, filled in as the files are written)."""
    with steps.step("write weights and plan"):
        save_weights(finite_state_dict(conversion.model), staging / weights_name)
        write_text_atomic(staging / "plan.json", conversion.plan.to_json())
    section.outputs = {"weights": str(out_dir / weights_name), "plan": str(out_dir / "plan.json")}
    if section.attribution:
        if plot_available():
            plot_attribution(
                section.attribution, staging / "attribution.png", f"{report.model}: what each site costs on its own"
            )
            section.outputs["plot"] = str(out_dir / "attribution.png")
        else:
            report.notes.append(
                "no chart of the per-site cost: install the plot extra (pip install 'normswap[plot]') for attribution.png"
            )
    if job.onnx:
        with steps.step("export ONNX"):
            exported = export_onnx_with_info(
                conversion.model, inputs, staging / "model.onnx", opset=job.opset, batch_inputs=job.batch_inputs
            )
        onnx_path = exported.path
        if exported.lowered:
            report.notes.append(
                f"the ONNX file was lowered to opset {exported.opset} (torch.onnx wrote a newer one): "
                f"{', '.join(exported.lowered)}, each by its definition at that opset"
            )
        if exported.traced:
            report.notes.append(exported.traced)
        section.outputs["onnx"] = str(out_dir / "model.onnx")
        if (staging / "model.onnx.data").exists():
            section.outputs["onnx_data"] = str(out_dir / "model.onnx.data")
        if job.validate:
            with steps.step("validate with onnxruntime"):
                section.validation = validate_onnx(
                    conversion.model,
                    onnx_path,
                    inputs,
                    original=model,
                    atol=job.atol,
                    rtol=job.rtol,
                    plan=conversion.plan,
                    batch_inputs=job.batch_inputs,
                    device=options.device,
                    opset=exported.opset,
                )
            if section.validation.drift is not None and "swap" not in section.drift:
                section.drift = {"swap": section.validation.drift, **section.drift}
    section.outputs.update({"report": str(out_dir / MANIFEST), "markdown": str(out_dir / "report.md")})
    write_text_atomic(staging / "report.md", report.to_markdown())
    section.manifest = manifest_of(staging)
    write_text_atomic(staging / MANIFEST, report.to_json())


def _calibration_data(model: torch.nn.Module, job: JobOptions) -> DataLoader:
    """The calibration file or folder, streamed in batches, checked to fit the model before
    anything else runs."""
    path = job.calibration_data
    assert path is not None
    if Path(path).is_dir():
        dataset: Any = ImageFolder(path, ImagePreprocessing(job.image_size, job.image_mean, job.image_std))
    else:
        dataset = TensorSamples(load_calibration_tensor(path))
    loader = DataLoader(
        dataset, batch_size=job.calibration_batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    check_model_accepts(model, [(next(iter(loader)),)], source=path)
    return loader


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
