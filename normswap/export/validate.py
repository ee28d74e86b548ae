"""validate_onnx(): onnxruntime vs PyTorch (the verdict), batch independence, residual BatchNorm, drift.

An element fails when |ort - torch| > atol + rtol * |torch|. By default atol scales with each
output's magnitude (1e-4 * max|torch|): real models reach 1e2-1e4 and correct fp32 exports still
differ by ~1e-6 relative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import targets
from ..calibration.drift import Drift, DriftAccumulator, batch_samples, eval_outputs, flat_outputs
from ..errors import ValidationError
from ..plan import Plan
from ..postcondition import norms_in_train_mode
from ..torchutil import as_input_tuple, batch_of, batch_size_of, preserved
from .onnx import METADATA_BATCHNORM_OPS, facts_from_metadata, onnx_file_facts
from .residual import residual_batchnorm

DEFAULT_RTOL = 1e-4
RELATIVE_ATOL = 1e-4  # default atol, as a fraction of the output's largest magnitude


@dataclass
class OutputCheck:
    """One output at one batch size."""

    batch_size: int
    output: int
    max_abs: float
    max_rel: float
    mean_abs: float
    atol: float
    rtol: float
    needed_atol: float  # smallest atol that would pass at this rtol
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"output {self.output} at batch {self.batch_size}: {verdict} (max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, "
            f"mean abs {self.mean_abs:.3g}; atol {self.atol:.3g}, rtol {self.rtol:g}; would pass with atol >= {self.needed_atol:.3g})"
        )


@dataclass
class Validation:
    """Everything validate_onnx measured. `passed` is the verdict."""

    onnx_path: str
    exporter: str
    opset: str
    outputs: list[OutputCheck]
    batch_independent_eval: bool
    batch_independent_train: bool
    batch_independence_required: bool
    residual_onnx_ops: int
    residual_onnx_allowed: bool
    residual_modules: list[str]
    drift: Drift | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def fidelity_passed(self) -> bool:
        return all(check.passed for check in self.outputs)

    @property
    def residual_passed(self) -> bool:
        return not self.residual_modules and (self.residual_onnx_ops == 0 or self.residual_onnx_allowed)

    @property
    def passed(self) -> bool:
        independent = self.batch_independent_eval and self.batch_independent_train
        return self.fidelity_passed and self.residual_passed and (independent or not self.batch_independence_required)

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda c: c.max_abs, default=None)
        detail = f"max abs error {worst.max_abs:.3g} at batch {worst.batch_size}" if worst else "no outputs"
        verdict = "passed" if self.passed else "FAILED"
        independence = (
            "batch-independent"
            if self.batch_independent_eval and self.batch_independent_train
            else (
                "batch-dependent in "
                + " and ".join(m for m, ok in (("eval", self.batch_independent_eval), ("train", self.batch_independent_train)) if not ok)
            )
        )
        return f"validation {verdict}: onnxruntime vs PyTorch {detail}; {independence}; {self.residual_onnx_ops} BatchNormalization op(s) in ONNX"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "onnx": self.onnx_path,
            "exporter": self.exporter,
            "opset": self.opset,
            "fidelity": {"passed": self.fidelity_passed, "outputs": [c.to_dict() for c in self.outputs]},
            "batch_independence": {
                "eval": self.batch_independent_eval,
                "train": self.batch_independent_train,
                "required": self.batch_independence_required,
            },
            "residual_batchnorm": {
                "passed": self.residual_passed,
                "onnx_ops": self.residual_onnx_ops,
                "onnx_ops_allowed": self.residual_onnx_allowed,
                "modules": list(self.residual_modules),
            },
            "drift": self.drift.to_dict() if self.drift else None,
            "messages": list(self.messages),
        }

    def to_markdown(self) -> str:
        lines = [f"**{self.summary()}**", "", "| Batch | Output | Max abs | Max rel | Mean abs | atol | Result |", "|---|---|---|---|---|---|---|"]
        for c in self.outputs:
            lines.append(
                f"| {c.batch_size} | {c.output} | {c.max_abs:.3g} | {c.max_rel:.3g} | {c.mean_abs:.3g} | {c.atol:.3g} | {'ok' if c.passed else 'FAILED'} |"
            )
        lines += [""] + [f"- {m}" for m in self.messages]
        return "\n".join(lines).rstrip()


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime refused the file: one sentence, with the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValidationError(f"onnxruntime cannot load '{path}': {first}.") from exc


def run_onnx(session, inputs: tuple) -> list[np.ndarray]:
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), [x for x in inputs if isinstance(x, torch.Tensor)], strict=False)}
    try:
        return session.run(None, feeds)
    except Exception as exc:  # onnxruntime failed on the inputs: one sentence, with the cause
        shapes = ", ".join(str(tuple(v.shape)) for v in feeds.values())
        raise ValidationError(
            f"onnxruntime failed to run the exported model on inputs of shape {shapes}: {str(exc).strip().splitlines()[0]}."
        ) from exc


def compare(expected: np.ndarray, actual: np.ndarray, atol: float | None, rtol: float, batch: int, index: int) -> OutputCheck:
    expected = expected.astype(np.float64)
    actual = actual.astype(np.float64)
    if expected.shape != actual.shape:
        return OutputCheck(batch, index, float("inf"), float("inf"), float("inf"), atol or 0.0, rtol, float("inf"), False)
    magnitude = float(np.abs(expected).max()) if expected.size else 0.0
    tolerance = atol if atol is not None else max(RELATIVE_ATOL * magnitude, 1e-7)
    error = np.abs(actual - expected)
    finite = np.isfinite(actual).all()
    max_abs = float(error.max()) if error.size else 0.0
    max_rel = float((error / np.maximum(np.abs(expected), 1e-12)).max()) if error.size else 0.0
    needed = float(np.maximum(error - rtol * np.abs(expected), 0).max()) if error.size else 0.0
    passed = bool(finite and (error <= tolerance + rtol * np.abs(expected)).all())
    return OutputCheck(batch, index, max_abs, max_rel, float(error.mean()) if error.size else 0.0, tolerance, rtol, needed, passed)


def batch_independent(model: nn.Module, inputs: tuple, train: bool, samples: int = 4, known: dict[int, list[torch.Tensor]] | None = None) -> bool:
    """Is each sample's output the same alone as inside the batch? In train mode only the
    normalization layers train: dropout, stochastic depth and training-only code stay off.

    `known` maps a batch size b to eval-mode outputs already computed on `batch_of(inputs, b)`;
    eval-mode checks reuse them instead of running the model again.
    """
    size = max(2, min(samples, batch_size_of(inputs)))
    batch = batch_of(inputs, size)
    known = known if (known is not None and not train) else {}
    mode = norms_in_train_mode(model) if train else preserved(model)
    with mode, torch.no_grad():
        if not train:
            model.eval()
        try:
            together = known.get(size) or flat_outputs(model(*batch))
            alone = [(known.get(1) if i == 0 else None) or flat_outputs(model(*tuple(x[i : i + 1] for x in batch))) for i in range(size)]
        except ValueError:  # BatchNorm refusing a batch of one in train mode
            return False
    for index, output in enumerate(together):
        stacked = torch.cat([a[index] for a in alone])
        scale = float(output.abs().max()) if output.numel() else 0.0
        # fp32 reductions of one sample vs a batch differ only in summation order
        if stacked.shape != output.shape or not torch.allclose(stacked, output, rtol=1e-4, atol=1e-5 + 1e-5 * scale):
            return False
    return True


def count_onnx_batchnorm(path: Path) -> int:
    """BatchNormalization ops in the file's graph (always read from the file)."""
    return onnx_file_facts(path)[0]


def _facts_from_session(session, path: Path) -> tuple[int, dict[str, str]]:
    """Op count and exporter from the metadata export_onnx recorded; other files are read in full."""
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_BATCHNORM_OPS in props:
        return int(props[METADATA_BATCHNORM_OPS]), facts_from_metadata(props)
    return onnx_file_facts(path)


def validate_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    example_inputs: Any,
    *,
    original: nn.Module | None = None,
    atol: float | None = None,
    rtol: float = DEFAULT_RTOL,
    plan: Plan | None = None,
    session: Any = None,
) -> Validation:
    """Check an exported file against the PyTorch model it came from.

    Args:
        model: the (converted) PyTorch model that was exported.
        onnx_path: the exported file.
        example_inputs: tensor or tuple of tensors, batch first.
        original: the model before conversion, for drift (information only).
        atol: absolute tolerance; default 1e-4 x the largest |output| of each output.
        rtol: relative tolerance.
        plan: the conversion plan; sites it keeps may leave BatchNorm behind.
        session: an existing onnxruntime session for `onnx_path` (created once otherwise).

    Returns:
        Validation; `.passed` is the verdict (fidelity at batch 1 and at the example batch size,
        no unplanned BatchNorm, and batch independence when the plan converts every site).
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise ValidationError(f"ONNX file '{path}' does not exist.")
    inputs = as_input_tuple(example_inputs)
    session = session or _session(path)
    example_batch = batch_size_of(inputs)
    sizes = [1, example_batch] if example_batch > 1 else [1, 3]  # a second size proves the batch axis is dynamic
    checks, messages = [], []
    known: dict[int, list[torch.Tensor]] = {}  # eval outputs by batch size, reused below
    for size in sizes:
        batch = batch_of(inputs, size)
        expected = known[size] = eval_outputs(model, batch)
        actual = run_onnx(session, batch)
        if len(actual) != len(expected):
            messages.append(f"the ONNX model has {len(actual)} output(s), PyTorch {len(expected)}")
        for index, (e, a) in enumerate(zip(expected, actual, strict=False)):  # a count mismatch is reported above
            check = compare(e.numpy(), a, atol, rtol, size, index)
            checks.append(check)
            if not check.passed:
                messages.append(check.describe())
    ops, info = _facts_from_session(session, path)
    allowed = bool(plan is not None and any(e.keeps_batchnorm_op for e in plan))
    residual = residual_batchnorm(model, plan)
    if residual:
        messages.append(f"BatchNorm left in the model: {', '.join(residual)}")
    if ops and not allowed:
        messages.append(f"{ops} BatchNormalization op(s) left in the ONNX graph that the plan did not keep")
    required = plan is not None and all(
        not targets.get(e.target).batch_statistics or e.params.get("batch_independent") or e.params.get("unused") for e in plan
    )
    independent_eval = batch_independent(model, inputs, train=False, known=known)
    independent_train = batch_independent(model, inputs, train=True)
    for mode, ok in (("eval", independent_eval), ("train", independent_train)):
        if not ok:
            messages.append(f"the PyTorch model is batch-dependent in {mode} mode: a sample's output changes with the rest of the batch")
    drift = None
    if original is not None:
        accumulator = DriftAccumulator()
        accumulator.add(eval_outputs(original, inputs), known.get(example_batch) or eval_outputs(model, inputs), batch_samples(inputs))
        drift = accumulator.result()
    return Validation(
        str(path.name),
        info["exporter"],
        info["opset"],
        checks,
        independent_eval,
        independent_train,
        required,
        ops,
        allowed,
        residual,
        drift,
        messages,
    )
