"""validate_onnx(): onnxruntime vs PyTorch (the verdict), batch independence, residual BatchNorm, drift.

Fidelity is judged per output at batch 1 and at the example's batch size (so a batch axis that is
not really dynamic fails), with tolerances relative to each output's scale, dtype and the model's
own rounding error (tolerance.py). Inputs that carry no batch (a graph's edge_index) are left as
they are; a model without a batch axis, or a file exported at a fixed batch size, is checked at
that size only, and the report says which checks were skipped and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import targets
from ..calibration.device import placed, resolve_device, to_device
from ..calibration.drift import Drift, DriftAccumulator, eval_outputs, flat_outputs
from ..errors import ValidationError
from ..plan import Plan
from ..postcondition import norms_in_train_mode
from ..torchutil import as_input_tuple, batch_of, batch_size_of, preserved, require_module, require_type, resolve_batch_inputs
from .onnx import METADATA_BATCHNORM_OPS, count_batchnorm_proto, facts_from_metadata, onnx_file_facts
from .residual import residual_batchnorm
from .tolerance import ROUNDING_MULTIPLE, OutputCheck, Rounding, compare, eval_outputs_exact

__all__ = ["OutputCheck", "Validation", "batch_independent", "compare", "count_onnx_batchnorm", "validate_onnx"]


@dataclass
class Validation:
    """Everything validate_onnx measured. `passed` is the verdict."""

    onnx_path: str
    exporter: str
    opset: str
    outputs: list[OutputCheck]
    batch_independent_eval: bool | None  # None: not checked (see `skipped`)
    batch_independent_train: bool | None
    batch_independence_required: bool
    residual_onnx_ops: int
    residual_onnx_allowed: bool
    residual_modules: list[str]
    drift: Drift | None = None
    messages: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checks not made, each with its reason
    batch_inputs: tuple[int, ...] = ()

    @property
    def fidelity_passed(self) -> bool:
        return bool(self.outputs) and all(check.passed for check in self.outputs)

    @property
    def residual_passed(self) -> bool:
        return not self.residual_modules and (self.residual_onnx_ops == 0 or self.residual_onnx_allowed)

    @property
    def independence_passed(self) -> bool:
        """Batch independence where it is required and could be checked."""
        return not self.batch_independence_required or (self.batch_independent_eval is not False and self.batch_independent_train is not False)

    @property
    def passed(self) -> bool:
        return self.fidelity_passed and self.residual_passed and self.independence_passed

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda c: c.max_abs, default=None)
        detail = f"max abs error {worst.max_abs:.3g} at batch {worst.batch_size}" if worst else "no outputs"
        verdict = "passed" if self.passed else "FAILED"
        modes = (("eval", self.batch_independent_eval), ("train", self.batch_independent_train))
        if all(ok is None for _, ok in modes):
            independence = "batch independence not checked"
        elif all(ok is not False for _, ok in modes):
            independence = "batch-independent"
        else:
            independence = "batch-dependent in " + " and ".join(m for m, ok in modes if ok is False)
        return f"validation {verdict}: onnxruntime vs PyTorch {detail}; {independence}; {self.residual_onnx_ops} BatchNormalization op(s) in ONNX"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "onnx": self.onnx_path,
            "exporter": self.exporter,
            "opset": self.opset,
            "batch_inputs": list(self.batch_inputs),
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
            "skipped": list(self.skipped),
        }

    def to_markdown(self) -> str:
        lines = [
            f"**{self.summary()}**",
            "",
            "| Batch | Output | Scale | Max abs | Max rel | Model's own rounding | atol | Result |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in self.outputs:
            rounding = f"{c.rounding:.3g}" if c.rounding is not None else "-"
            lines.append(
                f"| {c.batch_size} | {c.output} | {c.scale:.3g} | {c.max_abs:.3g} | {c.max_rel:.3g} | {rounding} | {c.atol:.3g} | {'ok' if c.passed else 'FAILED'} |"
            )
        lines += [""] + [f"- {m}" for m in self.messages] + [f"- not checked: {s}" for s in self.skipped]
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
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), tensors, strict=False)}
    try:
        return session.run(None, feeds)
    except Exception as exc:  # onnxruntime failed on the inputs: one sentence, with the cause
        shapes = ", ".join(str(tuple(v.shape)) for v in feeds.values())
        raise ValidationError(
            f"onnxruntime failed to run the exported model on inputs of shape {shapes}: {str(exc).strip().splitlines()[0]}."
        ) from exc


def batch_independent(
    model: nn.Module,
    inputs: tuple,
    train: bool,
    samples: int = 4,
    known: dict[int, list[torch.Tensor]] | None = None,
    batch_inputs: Sequence[int] | None = None,
    rounding: Sequence[float] = (),
) -> bool:
    """Is each sample's output the same alone as inside the batch? In train mode only the
    normalization layers train: dropout, stochastic depth and training-only code stay off.

    `known` maps a batch size b to eval-mode outputs already computed on `batch_of(inputs, b)`;
    eval-mode checks reuse them instead of running the model again. `rounding` is the model's
    own rounding error per output (see tolerance.py): summation order differs between a batch
    and one sample, so differences up to a multiple of it are arithmetic, not batch dependence.
    """
    indices = resolve_batch_inputs(inputs, batch_inputs)
    size = max(2, min(samples, batch_size_of(inputs, indices)))
    batch = batch_of(inputs, size, indices)
    known = known if (known is not None and not train) else {}
    mode = norms_in_train_mode(model) if train else preserved(model)
    with mode, torch.no_grad():
        if not train:
            model.eval()
        try:
            together = known.get(size) or [t.float() for t in flat_outputs(model(*batch))]
            alone = [
                (known.get(1) if i == 0 else None) or [t.float() for t in flat_outputs(model(*batch_of(_sample(batch, i, indices), 1, indices)))]
                for i in range(size)
            ]
        except ValueError:  # BatchNorm refusing a batch of one in train mode
            return False
    for index, output in enumerate(together):
        stacked = torch.cat([a[index] for a in alone])
        scale = float(output.abs().max()) if output.numel() else 0.0
        # without a measured rounding error: the fixed floor of earlier versions (outputs that
        # cancel to ~0 carry rounding noise of their intermediate values, not of their own scale)
        slack = ROUNDING_MULTIPLE * rounding[index] if index < len(rounding) else 1e-5
        if stacked.shape != output.shape or not torch.allclose(stacked, output, rtol=1e-4, atol=slack + 1e-5 * scale):
            return False
    return True


def _sample(batch: tuple, i: int, indices: Sequence[int]) -> tuple:
    return tuple(x[i : i + 1] if index in indices else x for index, x in enumerate(batch))


def count_onnx_batchnorm(path: Path) -> int:
    """BatchNormalization ops in the file's graph (always read from the file)."""
    return onnx_file_facts(path)[0]


def _facts_from_session(session, path: Path) -> tuple[int, dict[str, str]]:
    """Op count and exporter from the metadata export_onnx recorded; other files are read in full."""
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_BATCHNORM_OPS in props:
        return int(props[METADATA_BATCHNORM_OPS]), facts_from_metadata(props)
    return onnx_file_facts(path)


def _fixed_batch(input_shapes: Sequence[Sequence[int | None]], indices: Sequence[int]) -> int | None:
    """The file's batch size when its batch inputs have a fixed dimension 0."""
    shapes = [input_shapes[i] for i in indices if i < len(input_shapes)]
    fixed = {shape[0] for shape in shapes if shape and isinstance(shape[0], int)}
    return min(fixed) if fixed else None


def _file_facts(path: Path, session: Any) -> tuple[int, dict[str, str], list[list[int | None]]]:
    """BatchNormalization op count, exporter facts and each graph input's shape (an int per
    fixed dimension): from the session when one is given, else from the file (its weights are
    read and dropped again; no session is held yet)."""
    if session is not None:
        ops, info = _facts_from_session(session, path)
        return ops, info, [[d if isinstance(d, int) else None for d in i.shape] for i in session.get_inputs()]
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # not an ONNX protobuf: one sentence, with the cause
        raise ValidationError(
            f"onnxruntime cannot load '{path}': it is not a readable ONNX file ({str(exc).strip()[:120] or type(exc).__name__})."
        ) from exc
    props = {p.key: p.value for p in proto.metadata_props}
    default_opset = str(proto.opset_import[0].version) if proto.opset_import else "unknown"
    ops = int(props[METADATA_BATCHNORM_OPS]) if METADATA_BATCHNORM_OPS in props else count_batchnorm_proto(proto)
    info = facts_from_metadata(props, default_opset)
    initializers = {i.name for i in proto.graph.initializer}
    shapes = [
        [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
        if i.name not in initializers
    ]
    return ops, info, shapes


def validate_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    example_inputs: Any,
    *,
    original: nn.Module | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    plan: Plan | None = None,
    session: Any = None,
    batch_inputs: Sequence[int] | None = None,
    device: str | torch.device | None = "cpu",
) -> Validation:
    """Check an exported file against the PyTorch model it came from.

    Args:
        model: the (converted) PyTorch model that was exported.
        onnx_path: the exported file.
        example_inputs: tensor or tuple of tensors.
        original: the model before conversion, for drift (information only).
        atol, rtol: explicit tolerances replacing the defaults of `normswap.export.tolerance`
            (relative to each output's scale, dtype and the model's own rounding error).
        plan: the conversion plan; sites it keeps may leave BatchNorm behind.
        session: an existing onnxruntime session for `onnx_path` (created once otherwise).
        batch_inputs: indices of the inputs whose dimension 0 is the batch (default: detected,
            see `normswap.torchutil.resolve_batch_inputs`); `()` when none is.
        device: where the PyTorch side runs ("auto": this process's GPU when there is one);
            onnxruntime runs on the CPU. The models return to their own devices afterwards.

    Returns:
        Validation; `.passed` is the verdict: fidelity, no unplanned BatchNorm, and batch
        independence when the plan converts every batch-dependent site and it can be checked.
    """
    require_module(model, "validate_onnx")
    if original is not None:
        require_module(original, "validate_onnx")
    require_type(plan, Plan, "plan", "validate_onnx")
    path = Path(onnx_path)
    if not path.is_file():
        raise ValidationError(f"ONNX file '{path}' does not exist.")
    where = resolve_device(device)
    inputs = to_device(as_input_tuple(example_inputs), where)
    models = (model,) if original is None else (model, original)
    with placed(where, *models):
        return _validate(model, path, inputs, session, original, atol, rtol, plan, batch_inputs)


def _validate(
    model: nn.Module,
    path: Path,
    inputs: tuple,
    session: Any,
    original: nn.Module | None,
    atol: float | None,
    rtol: float | None,
    plan: Plan | None,
    batch_inputs: Sequence[int] | None,
) -> Validation:
    ops, info, input_shapes = _file_facts(path, session)
    indices = resolve_batch_inputs(inputs, batch_inputs)
    skipped: list[str] = []
    exact: dict[int, list[torch.Tensor]] = {}  # eval outputs in the model's dtype, by batch size
    sizes = _batch_sizes(model, input_shapes, inputs, indices, batch_inputs is None, info, skipped, exact)
    if not sizes:
        indices = ()
    # PyTorch first (its outputs and its float64 rounding error), onnxruntime after: the model's
    # float64 weights and the session's copy of the weights are never in memory together
    runs: list[int | None] = list(sizes) or [None]  # None: the example inputs as they are
    batches, expected_at = [], []
    known: dict[int, list[torch.Tensor]] = {}  # eval outputs by batch size, reused below
    for size in runs:
        batch = inputs if size is None else batch_of(inputs, size, indices)
        expected = exact.get(size) if size is not None else None
        expected = expected if expected is not None else eval_outputs_exact(model, batch)
        broken = next((i for i, t in enumerate(expected) if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if broken is not None:
            raise ValidationError(
                f"The PyTorch model's output {broken} holds NaN or infinite values on the example inputs"
                f"{'' if size is None else f' at batch {size}'}, so no export can be compared with it; check the model and its weights on such inputs."
            )
        if size is not None:
            known[size] = [t.float() for t in expected]
        batches.append(batch)
        expected_at.append(expected)
    rounding = Rounding(model)
    rounding_at = dict(zip(runs, [r or [] for r in rounding.errors_at(list(zip(batches, expected_at, strict=True)))], strict=True))
    session = session or _session(path)
    checks, messages = [], []
    for size, batch, expected in zip(runs, batches, expected_at, strict=True):
        errors = rounding_at[size]
        actual = run_onnx(session, batch)
        if len(actual) != len(expected):
            messages.append(f"the ONNX model has {len(actual)} output(s), PyTorch {len(expected)}")
        for index, (e, a) in enumerate(zip(expected, actual, strict=False)):  # a count mismatch is reported above
            check = compare(e, a, size or batch_size_of(batch, indices), index, errors[index] if index < len(errors) else None, atol, rtol)
            checks.append(check)
            if not check.passed:
                messages.append(check.describe())
    del session
    if rounding.problem:
        skipped.append(rounding.problem)
    allowed = bool(plan is not None and any(e.keeps_batchnorm_op for e in plan))
    residual = residual_batchnorm(model, plan)
    if residual:
        messages.append(f"BatchNorm left in the model: {', '.join(residual)}")
    if ops and not allowed:
        messages.append(f"{ops} BatchNormalization op(s) left in the ONNX graph that the plan did not keep")
    required = plan is not None and all(
        not targets.get(e.target).batch_statistics or e.params.get("batch_independent") or e.params.get("unused") for e in plan
    )
    independent: dict[str, bool | None] = {"eval": None, "train": None}
    if indices:
        slack = rounding_at.get(max(sizes), [])
        independent["eval"] = batch_independent(model, inputs, train=False, known=known, batch_inputs=indices, rounding=slack)
        independent["train"] = batch_independent(model, inputs, train=True, batch_inputs=indices, rounding=slack)
    else:
        skipped.append("batch independence: no input carries a batch to split")
    for mode, ok in independent.items():
        if ok is False:
            messages.append(f"the PyTorch model is batch-dependent in {mode} mode: a sample's output changes with the rest of the batch")
    drift = None
    if original is not None:
        accumulator = DriftAccumulator()
        example = batch_size_of(inputs, indices)
        converted = known.get(example) or eval_outputs(model, inputs)
        accumulator.add(eval_outputs(original, inputs), converted, example if indices else 1)
        drift = accumulator.result()
    return Validation(
        path.name, info["exporter"], info["opset"], checks, independent["eval"], independent["train"], required,
        ops, allowed, residual, drift, messages, skipped, indices,
    )  # fmt: skip


def _batch_sizes(
    model: nn.Module,
    input_shapes: Sequence[Sequence[int | None]],
    inputs: tuple,
    indices: tuple[int, ...],
    detected: bool,
    info: dict[str, str],
    skipped: list[str],
    exact: dict[int, list[torch.Tensor]],
) -> list[int]:
    """The batch sizes to compare at: 1 and the example's (a second size proves the batch axis is
    dynamic); only the file's own size when it has a fixed one; none when no input carries a
    batch (or, when the batch inputs were guessed, the model does not run on one sample: then
    the outputs at batch 1 it did compute are kept in `exact`)."""
    if not indices:
        skipped.append("batch-size variation: no input carries a batch (the example inputs are compared as they are)")
        return []
    example = batch_size_of(inputs, indices)
    fixed = _fixed_batch(input_shapes, indices)
    if fixed is not None:
        note = info.get("batch_note") or f"the file has a fixed batch size of {fixed}"
        skipped.append(f"batch-size variation: {note}")
        return [fixed]
    if detected:
        try:
            exact[1] = eval_outputs_exact(model, batch_of(inputs, 1, indices))
        except Exception as exc:  # noqa: BLE001 - the guess was wrong: the model cannot run on one sample (reported)
            skipped.append(
                f"batch-size variation: the model does not run on inputs {list(indices)} cut to one sample "
                f"({type(exc).__name__}: {str(exc).strip()[:120]}); pass batch_inputs (--batch-inputs) to say which inputs carry the batch"
            )
            return []
    return [1, example] if example > 1 else [1, 3]
