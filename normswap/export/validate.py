"""validate_onnx(): onnxruntime vs PyTorch (the verdict), batch independence, residual BatchNorm, drift.

Fidelity is judged per output at batch 1 and at the example's batch size (so a batch axis that is
not really dynamic fails), with tolerances relative to each output's scale, dtype and the model's
own rounding error (tolerance.py). Inputs that carry no batch (a graph's edge_index) are left as
they are; a model without a batch axis, or a file exported at a fixed batch size, is checked at
that size only, and the report says which checks were skipped and why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..calibration.device import placed, resolve_device, to_device
from ..calibration.drift import Drift, DriftAccumulator, eval_outputs
from ..errors import ValidationError
from ..plan import Plan
from ..torchutil import as_input_tuple, batch_of, batch_size_of, require_module, require_type, resolve_batch_inputs
from .independence import Independence, batch_independent
from .onnx import (
    METADATA_BATCHNORM_OPS,
    METADATA_TRACED,
    count_batchnorm_proto,
    facts_from_metadata,
    onnx_file_facts,
)
from .opset import file_header
from .residual import residual_batchnorm
from .tolerance import OutputCheck, Rounding, compare, describe_check, eval_outputs_exact

__all__ = ["OutputCheck", "Validation", "batch_independent", "compare", "count_onnx_batchnorm", "validate_onnx"]


@dataclass
class Validation:
    """Everything validate_onnx measured. `passed` is the verdict; `messages` says what failed."""

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
    opset_problem: str = ""  # the file's own opset_import is not what was asked for (or recorded)
    traced: str = ""  # the file was traced: it holds one path of the model's control flow (the sentence)

    @property
    def fidelity_passed(self) -> bool:
        return bool(self.outputs) and all(check.passed for check in self.outputs)

    @property
    def residual_passed(self) -> bool:
        return not self.residual_modules and (self.residual_onnx_ops == 0 or self.residual_onnx_allowed)

    @property
    def independence_passed(self) -> bool:
        """Batch independence where it is required and could be checked."""
        return not self.batch_independence_required or (
            self.batch_independent_eval is not False and self.batch_independent_train is not False
        )

    @property
    def passed(self) -> bool:
        return self.fidelity_passed and self.residual_passed and self.independence_passed and not self.opset_problem

    def summary(self) -> str:
        """The verdict in one line: 'validation passed: onnxruntime vs PyTorch max abs error ...;
        batch-independent; 0 BatchNormalization op(s) in ONNX'."""
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
        summary = f"validation {verdict}: onnxruntime vs PyTorch {detail}; {independence}; {self.residual_onnx_ops} BatchNormalization op(s) in ONNX"
        return summary + "".join(f"; {caveat}" for caveat in (self.opset_problem, self.traced) if caveat)


@dataclass
class _Run:
    """The inputs at one batch size (None: the example inputs as they are) and PyTorch's outputs."""

    size: int | None
    inputs: tuple
    expected: list[torch.Tensor]


def _run_options():
    """Run options that keep onnxruntime from logging a failure normswap reports as a sentence."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime refused the file: one sentence, with the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValidationError(f"onnxruntime cannot load '{path}': {first}.") from exc


def run_onnx(session, inputs: tuple, path: Path | None = None) -> list[np.ndarray]:
    """onnxruntime's outputs on `inputs`, fed as the exporters flatten them: every tensor of
    nested lists, tuples and dicts (torchvision detectors take `[image, ...]`), in order.

    Raises:
        ValidationError: onnxruntime fails; when it names the failing node and `path` is given,
            the sentence names the outputs that depend on it.
    """
    tensors = [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor)]
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), tensors, strict=False)}
    quiet = _run_options()
    try:
        return session.run(None, feeds, quiet)
    except Exception as exc:  # onnxruntime failed on the inputs: one sentence, with the cause
        shapes = ", ".join(str(tuple(v.shape)) for v in feeds.values())
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        node = re.search(r"running (\w+) node\. Name:'([^']*)'", cause)
        outputs = _outputs_after(path, node.group(2)) if node and path is not None else []
        if node and outputs:
            named = ", ".join(f"output {i} ('{name}')" for i, name in outputs)
            raise ValidationError(
                f"onnxruntime cannot compute {named} of the exported model on inputs of shape {shapes}: its {node.group(1)} "
                f"node '{node.group(2)}' fails on them ({_reason(cause[node.end() :])}); that output depends on the "
                "data through a size or path the file fixed at export."
            ) from exc
        raise ValidationError(
            f"onnxruntime failed to run the exported model on inputs of shape {shapes}: {cause}."
        ) from exc


def _reason(status: str) -> str:
    """onnxruntime's status message without its source location: "The input tensor cannot be
    reshaped to the requested shape. Input shape:{16}, requested shape:{2,33}"."""
    message = status.split("Status Message:", 1)[-1]
    message = message.split(" was false. ", 1)[-1]  # ORT_ENFORCE's "<file>:<line> <function> <condition> was false."
    return message.strip(" :.")[:200]


def _outputs_after(path: Path, node_name: str) -> list[tuple[int, str]]:
    """(index, name) of the graph outputs that depend on the node called `node_name`."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    start = next((node for node in graph.node if node.name == node_name), None)
    if start is None:
        return []
    reached = set(start.output)
    for node in graph.node:  # graph nodes are stored in topological order
        if reached & set(node.input):
            reached |= set(node.output)
    return [(i, output.name) for i, output in enumerate(graph.output) if output.name in reached]


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
    read and dropped again; no session is held yet). The opset is the file's own opset_import
    ("opset"; "recorded_opset": what its metadata says), read past the graph."""
    try:
        opsets, props = file_header(str(path))
    except (OSError, ValueError) as exc:
        raise ValidationError(f"onnxruntime cannot load '{path}': it is not a readable ONNX file ({exc}).") from exc
    ops, info, shapes = _read_facts(path, session)
    real = opsets.get("", opsets.get("ai.onnx"))
    info.update(recorded_opset=info["opset"], opset=str(real), traced=props.get(METADATA_TRACED, ""))
    return ops, info, shapes


def _read_facts(path: Path, session: Any) -> tuple[int, dict[str, str], list[list[int | None]]]:
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
    opset: int | None = None,
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
        opset: the opset the file was exported for: its own opset_import must be that (a
            runtime limited to it rejects anything newer); without it, the file must be the
            opset its metadata records.

    Returns:
        Validation; `.passed` is the verdict: fidelity, no unplanned BatchNorm, the opset, and
        batch independence when the plan converts every batch-dependent site and it can be checked.
        A file that was traced (torch.export could not capture the model) holds the path the
        example inputs take through data-dependent control flow: `.traced` says so, and the
        summary carries that sentence.
        Outputs without a batch axis (a scalar loss, say) are compared for fidelity and left out
        of batch independence, which `.skipped` says.
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
        return _validate(model, path, inputs, session, original, atol, rtol, plan, batch_inputs, opset)


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
    opset: int | None,
) -> Validation:
    ops, info, input_shapes = _file_facts(path, session)
    opset_problem = _opset_problem(info, opset)
    indices = resolve_batch_inputs(inputs, batch_inputs)
    skipped: list[str] = []
    exact: dict[int, list[torch.Tensor]] = {}  # eval outputs in the model's dtype, by batch size
    sizes = _batch_sizes(model, input_shapes, inputs, indices, batch_inputs is None, info, skipped, exact)
    if not sizes:
        indices = ()
    # PyTorch first (its outputs and its float64 rounding error), onnxruntime after: the model's
    # float64 weights and the session's copy of the weights are never in memory together
    runs = _reference_runs(model, inputs, sizes, indices, exact)
    rounding = Rounding(model)
    errors = rounding.errors_at([(run.inputs, run.expected) for run in runs])
    checks, messages = _fidelity(session or _session(path), path, runs, errors, indices, atol, rtol)
    if rounding.problem:
        skipped.append(rounding.problem)
    residual = residual_batchnorm(model, plan)
    allowed = bool(plan is not None and any(e.keeps_batchnorm_op for e in plan))
    messages += _residual_messages(residual, ops, allowed)
    if opset_problem:
        messages.append(opset_problem)
    known = {run.size: [t.float() for t in run.expected] for run in runs if run.size is not None}
    slack = (errors[-1] or []) if sizes else []  # the rounding error at the largest batch size
    independence = _independence(model, inputs, indices, known, slack, skipped)
    required = _independence_required(plan)
    for mode, verdict in independence.items():
        if verdict is False:
            messages.append(
                f"the PyTorch model is batch-dependent in {mode} mode: a sample's output changes with the rest of the batch"
                + ("" if required else " (expected: the plan keeps batch statistics)")
            )
    return Validation(
        onnx_path=path.name,
        exporter=info["exporter"],
        opset=info["opset"],
        outputs=checks,
        batch_independent_eval=independence["eval"],
        batch_independent_train=independence["train"],
        batch_independence_required=required,
        residual_onnx_ops=ops,
        residual_onnx_allowed=allowed,
        residual_modules=residual,
        drift=_drift(model, original, inputs, indices, known) if original is not None else None,
        messages=messages,
        skipped=skipped,
        batch_inputs=indices,
        opset_problem=opset_problem,
        traced=info["traced"],
    )


def _opset_problem(info: dict[str, str], requested: int | None) -> str:
    """Why the file's own opset is not the one it should be ("" when it is)."""
    real, recorded = info["opset"], info["recorded_opset"]
    if requested is not None and real != str(requested):
        return f"the file is opset {real} (its opset_import), not the opset {requested} it was exported for"
    if recorded != real:
        return f"the file's metadata records opset {recorded} but it imports opset {real}"
    return ""


def _reference_runs(
    model: nn.Module, inputs: tuple, sizes: list[int], indices: tuple[int, ...], exact: dict[int, list[torch.Tensor]]
) -> list[_Run]:
    """PyTorch's eval outputs at each batch size (the example inputs as they are without one).

    Raises:
        ValidationError: an output holds NaN or infinite values, so no export can match it.
    """
    runs = []
    wanted: list[int | None] = [*sizes] or [None]
    for size in wanted:
        batch = inputs if size is None else batch_of(inputs, size, indices)
        expected = exact.get(size) if size is not None else None
        expected = expected if expected is not None else eval_outputs_exact(model, batch)
        broken = next(
            (i for i, t in enumerate(expected) if t.is_floating_point() and not bool(torch.isfinite(t).all())), None
        )
        if broken is not None:
            raise ValidationError(
                f"The PyTorch model's output {broken} holds NaN or infinite values on the example inputs"
                f"{'' if size is None else f' at batch {size}'}, so no export can be compared with it; check the model and its weights on such inputs."
            )
        runs.append(_Run(size, batch, expected))
    return runs


def _fidelity(
    session: Any,
    path: Path,
    runs: list[_Run],
    errors: list[list[float] | None],
    indices: tuple[int, ...],
    atol: float | None,
    rtol: float | None,
) -> tuple[list[OutputCheck], list[str]]:
    """Each output of each run compared with onnxruntime's, and a sentence per failure."""
    checks, messages = [], []
    for run, rounding in zip(runs, errors, strict=True):
        actual = run_onnx(session, run.inputs, path)
        if len(actual) != len(run.expected):
            messages.append(f"the ONNX model has {len(actual)} output(s), PyTorch {len(run.expected)}")
        for index, (e, a) in enumerate(zip(run.expected, actual, strict=False)):  # a count mismatch is reported above
            error = rounding[index] if rounding is not None and index < len(rounding) else None
            check = compare(e, a, run.size or batch_size_of(run.inputs, indices), index, error, atol, rtol)
            checks.append(check)
            if not check.passed:
                messages.append(describe_check(check))
    return checks, messages


def _residual_messages(residual: list[str], ops: int, allowed: bool) -> list[str]:
    messages = []
    if residual:
        messages.append(f"BatchNorm left in the model: {', '.join(residual)}")
    if ops and not allowed:
        messages.append(f"{ops} BatchNormalization op(s) left in the ONNX graph that the plan did not keep")
    return messages


def _independence_required(plan: Plan | None) -> bool:
    """Batch independence is part of the verdict when the plan leaves no batch statistics."""
    return plan is not None and all(not entry.uses_batch_statistics for entry in plan)


def _independence(
    model: nn.Module,
    inputs: tuple,
    indices: tuple[int, ...],
    known: dict[int, list[torch.Tensor]],
    slack: Sequence[float],
    skipped: list[str],
) -> dict[str, bool | None]:
    """The eval- and train-mode verdicts; what could not be judged goes to `skipped`."""
    if not indices:
        skipped.append("batch independence: no input carries a batch to split")
        return {"eval": None, "train": None}
    results: dict[str, Independence] = {
        "eval": batch_independent(model, inputs, train=False, known=known, batch_inputs=indices, rounding=slack),
        "train": batch_independent(model, inputs, train=True, batch_inputs=indices, rounding=slack),
    }
    left_out = dict.fromkeys(reason for result in results.values() for reason in result.left_out)
    skipped += [f"batch independence: {reason}" for reason in left_out]
    return {mode: result.independent for mode, result in results.items()}


def _drift(
    model: nn.Module, original: nn.Module, inputs: tuple, indices: tuple[int, ...], known: dict[int, list[torch.Tensor]]
) -> Drift:
    accumulator = DriftAccumulator()
    example = batch_size_of(inputs, indices)
    converted = known.get(example) or eval_outputs(model, inputs)
    accumulator.add(eval_outputs(original, inputs), converted, example if indices else 1)
    return accumulator.result()


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
