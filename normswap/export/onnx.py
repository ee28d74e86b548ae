"""export_onnx(): torch.onnx (dynamo exporter) with a dynamic batch axis, checked, written atomically."""

from __future__ import annotations

import contextlib
import gc
import linecache
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import targets
from ..errors import ExportError
from ..files import atomic_path
from ..source import relative_path
from ..torchutil import (
    as_input_tuple,
    batch_of,
    flat_outputs,
    has_number_outputs,
    preserved,
    quiet_torch,
    require_module,
    resolve_batch_inputs,
)
from .opset import default_opset, lower

log = logging.getLogger(__name__)

# At opset 18 GroupNorm exports as LayerNormalization over a (N, G, -1) view + Mul + Add and
# channel LayerNorm as Transpose -> LayerNormalization -> Transpose: the fastest correct forms
# measured in onnxruntime (benchmarks/bench_formulations.py). Opset 21's GroupNormalization op is
# opt-in (`opset=21`): slower in onnxruntime, and runtimes disagree on its older definition.
DEFAULT_OPSET = 18
MIN_OPSET = 14  # the oldest the dynamo exporter writes
# Above this many bytes of weights, ONNX's 2 GB protobuf limit needs external data.
EXTERNAL_DATA_BYTES = 1_500_000_000
METADATA_EXPORTER = "normswap.exporter"
METADATA_OPSET = "normswap.opset"
# Counted on the in-memory graph at export, so validation need not re-read a large file.
METADATA_BATCHNORM_OPS = "normswap.batchnorm_ops"
# The inputs whose dimension 0 is a dynamic batch axis ("none" when the file has a fixed batch).
METADATA_BATCH_INPUTS = "normswap.batch_inputs"
METADATA_BATCH_NOTE = "normswap.batch_note"
METADATA_LOWERED = "normswap.lowered"  # ops lowered to reach the opset asked for
# set when the TorchScript exporter traced the model: the file holds one path of its control flow
METADATA_TRACED = "normswap.traced"


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    exporter: str
    opset: int
    dynamic_batch: bool
    external_data: bool
    batch_inputs: tuple[int, ...] = ()
    note: str = ""  # why the batch axis is fixed, when it is
    lowered: tuple[str, ...] = ()  # ops normswap lowered to reach the opset ("LayerNormalization x2")
    traced: str = ""  # the sentence saying that the file holds one path of the model's control flow


def check_opset(opset: int) -> int:
    """`opset` when this installation can export and check it.

    Raises:
        ExportError: below MIN_OPSET or above the newest opset the installed onnx defines.
    """
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"Opset {opset!r} is outside what this installation exports and checks: {MIN_OPSET} to {newest} (onnx {onnx.__version__})."
        )
    return opset


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    batch_inputs: Sequence[int] | None = None,
) -> Path:
    """Export `model` (eval mode) to ONNX at `path` and check it with onnx.checker.

    Args:
        model: the model to export (its mode is restored afterwards).
        example_inputs: tensor or tuple of tensors.
        path: the .onnx file to write (atomically; weights beside it as external data when large).
        opset: ONNX opset (default DEFAULT_OPSET = 18).
        dynamic_batch: make dimension 0 of the batch inputs dynamic.
        batch_inputs: indices of the inputs whose dimension 0 is the batch (default: the tensor
            inputs whose dimension 0 equals the first one's); `()` for none.

    Returns:
        The path written. `export_info(path)` tells which exporter and opset produced it, and
        whether the batch axis stayed dynamic (a graph that depends on the batch size, e.g. one
        that splits the batch into chunks, is exported at the example's batch size).

    Raises:
        ExportError: the exporter failed (the message names the operator when it can) or the
        file cannot be written.
    """
    return export_onnx_with_info(
        model, example_inputs, path, opset=opset, dynamic_batch=dynamic_batch, batch_inputs=batch_inputs
    ).path


def export_onnx_with_info(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    batch_inputs: Sequence[int] | None = None,
) -> ExportInfo:
    """`export_onnx`, returning what was exported (see there)."""
    require_module(model, "export_onnx")
    inputs = as_input_tuple(example_inputs)
    opset = check_opset(opset or DEFAULT_OPSET)
    target = Path(path)
    batched = resolve_batch_inputs(inputs, batch_inputs) if dynamic_batch else ()
    if batched and all(inputs[i].shape[0] == 1 for i in batched):
        # torch.export specializes a dimension of size 1; export at batch 2 to keep it symbolic
        inputs = batch_of(inputs, 2, batched)
    dynamic_shapes = None
    if batched:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} if i in batched else None for i in range(len(inputs)))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    external = weight_bytes > EXTERNAL_DATA_BYTES
    note = ""
    with preserved(model), contextlib.ExitStack() as forms:
        for (
            registered
        ) in targets.registered():  # the form each target's modules export in (e.g. GroupNorm's faster one)
            forms.enter_context(registered.export_context(model, opset))
        model.eval()
        model = _exportable(model, inputs)
        try:
            program = _run_exporter(model, inputs, dynamic_shapes, opset)
            exporter = f"torch.onnx dynamo exporter (torch {torch.__version__})"
        except ExportError as dynamo_error:
            # data-dependent control flow defeats torch.export; the TorchScript exporter traces
            # the path the example inputs take, which validation then checks
            program = None
            exporter = f"torch.onnx TorchScript exporter (torch {torch.__version__})"
            with atomic_path(target) as temporary:
                try:
                    branches = _run_torchscript_exporter(model, inputs, temporary, opset, batched)
                except Exception:  # the fallback failed too: report the primary exporter's failure
                    log.debug("the TorchScript exporter failed as well", exc_info=True)
                    raise dynamo_error from None
                log.info(
                    "torch.export could not capture %s (%s); exported with the TorchScript exporter",
                    type(model).__name__,
                    dynamo_error,
                )
                traced = traced_sentence(branches)
                props = {**_batch_props(batched, ""), METADATA_EXPORTER: exporter, METADATA_OPSET: str(opset)}
                lowered = _finish(temporary, target, {**props, METADATA_TRACED: traced}, external=False, opset=opset)
    if program is not None:
        fixed = [i for i in batched if not _is_symbolic(program.model.graph.inputs[i].shape[0])]
        if fixed:
            # the exporter retried without the dynamic batch axis: the graph depends on the batch size
            note = (
                f"the exported graph has a fixed batch size of {inputs[fixed[0]].shape[0]}: the model's graph depends on the "
                "batch size (e.g. it splits the batch into chunks), so it runs at that batch size only"
            )
            batched = ()
        written = int(program.model.opset_imports.get("", opset))  # what torch.onnx really wrote
        props = {**_batch_props(batched, note), METADATA_EXPORTER: exporter, METADATA_OPSET: str(opset)}
        props[METADATA_BATCHNORM_OPS] = str(_count_batchnorm_ir(program.model))
        program.model.metadata_props.update(props)
        with atomic_path(target) as temporary:
            try:
                program.save(str(temporary), external_data=external)
            except OSError as exc:
                raise ExportError(f"Cannot write '{target}': {exc.strerror or exc}.") from exc
            program = None  # the exported graph and its serialization go before the checker reads the file back
            gc.collect()
            lowered = _finish(temporary, target, None, external, opset if written != opset else None)
        traced = ""
    return ExportInfo(target, exporter, opset, bool(batched), external, batched, note, lowered, traced)


class _NumbersAsTensors(nn.Module):
    """The model with its outputs flattened and each Python number among them a 0-dimensional
    tensor (the exporters cannot return a number), in the order validation reads them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(flat_outputs(self.model(*inputs)))


def _exportable(model: nn.Module, inputs: tuple) -> nn.Module:
    """`model`, wrapped when its output holds Python numbers (one eval forward tells)."""
    with torch.no_grad():
        output = model(*inputs)
    return _NumbersAsTensors(model).eval() if has_number_outputs(output) else model


def _is_symbolic(dim: Any) -> bool:
    return not isinstance(dim, int)


def _batch_props(batched: tuple[int, ...], note: str) -> dict[str, str]:
    return {METADATA_BATCH_INPUTS: ",".join(map(str, batched)) if batched else "none", METADATA_BATCH_NOTE: note}


def _finish(
    temporary: Path, target: Path, props: dict[str, str] | None, external: bool, opset: int | None = None
) -> tuple[str, ...]:
    """Bring the file to `opset` when given (the exporter may have written another: see opset.py),
    record `props` in its metadata (when not yet recorded, with the BatchNormalization op count),
    check it, place external data. Returns the ops lowered."""
    import onnx

    lowered: list[str] = []
    if props is not None or opset is not None:
        model = onnx.load(str(temporary), load_external_data=False)
        if opset is not None:
            lowered = _to_opset(model, opset)
            if lowered:
                props = {**(props or {}), METADATA_LOWERED: ", ".join(lowered)}
        if props is not None:
            onnx.helper.set_model_props(
                model, {**_metadata(model), **props, METADATA_BATCHNORM_OPS: str(count_batchnorm_proto(model))}
            )
        onnx.save(model, str(temporary))
    try:
        onnx.checker.check_model(str(temporary), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"The exported ONNX file '{target.name}' fails onnx.checker: {str(exc).splitlines()[0]}."
        ) from exc
    if external:
        _rename_external_data(temporary, target)
    return tuple(lowered)


def _metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _to_opset(model, opset: int) -> list[str]:
    """The file's real opset made `opset` (lowered, see opset.py), or an ExportError that says so."""
    written = default_opset(model)
    if written is None or written == opset:
        return []
    if written < opset:
        raise ExportError(
            f"torch.onnx wrote opset {written} where opset {opset} was asked for (it could not convert the graph); "
            f"export with --opset {written}."
        )
    lowered = lower(model, opset)
    log.info("lowered the exported graph from opset %d to %d: %s", written, opset, ", ".join(lowered))
    return lowered


def _count_batchnorm_ir(model) -> int:
    """BatchNormalization nodes in an onnx_ir model, subgraphs and functions included."""
    from onnx_ir import traversal

    graphs = [model.graph, *model.functions.values()]
    return sum(
        1
        for graph in graphs
        for node in traversal.RecursiveGraphIterator(graph)
        if node.op_type == "BatchNormalization"
    )


def _run_torchscript_exporter(
    model: nn.Module, inputs: tuple, path: Path, opset: int, batched: tuple[int, ...]
) -> list[tuple[str, int]]:
    """Trace and export; returns where the tracer warned that it recorded a branch on a tensor's
    value (file, line), in the order met."""
    names = [f"input_{i}" for i in range(len(inputs))]
    axes = {names[i]: {0: "batch"} for i in batched} or None
    with quiet_torch(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(
            model, inputs, str(path), dynamo=False, opset_version=opset, input_names=names, dynamic_axes=axes
        )
    places = [
        (w.filename, w.lineno)
        for w in caught
        if issubclass(w.category, torch.jit.TracerWarning) and str(w.message).startswith(_BRANCH_WARNINGS)
    ]
    # the model's own code first; torch's (its sanity checks on sizes) after
    return sorted(dict.fromkeys(places), key=lambda place: os.path.realpath(place[0]).startswith(_TORCH_DIRECTORY))


# what the tracer says when a tensor's value decides Python control flow (other TracerWarnings,
# e.g. "torch.as_tensor results are registered as constants", are about constants, not branches)
_BRANCH_WARNINGS = ("Converting a tensor to a Python", "Iterating over a tensor")
_TORCH_DIRECTORY = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep


def traced_sentence(branches: Sequence[tuple[str, int]]) -> str:
    """What a traced file holds, for the report, the metadata and the validation summary."""
    if not branches:
        return (
            "the file was traced (torch.export could not capture the model): it holds the path the example inputs took, "
            "and the tracer met no branch on a tensor's value"
        )
    where = "; ".join(
        f"{relative_path(file)}:{line}" + (f" `{code}`" if (code := linecache.getline(file, line).strip()) else "")
        for file, line in branches[:3]
    )
    more = f" and {len(branches) - 3} more" if len(branches) > 3 else ""
    return (
        "the file was traced (torch.export could not capture the model) and holds only the path the example inputs took "
        f"through data-dependent control flow at {where}{more}: inputs that take another path compute something else in "
        "onnxruntime, and validation checks the example's path only"
    )


def _run_exporter(model: nn.Module, inputs: tuple, dynamic_shapes: Any, opset: int):
    try:
        with quiet_torch():
            return torch.onnx.export(
                model, inputs, dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False
            )
    except Exception as exc:  # the exporter failed on the user's model: one sentence, operator when known
        text = re.sub(r"\x1b\[[0-9;]*m", "", f"{exc.__cause__ or exc}")
        operator = re.search(r"(aten::\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?|torch\.ops\.[\w.]+)", text)
        where = f" at operator {operator.group(1)}" if operator else ""
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise ExportError(
            f"torch.onnx could not export {type(model).__name__}{where}: {first[:300]}; try another --opset, or --no-onnx to skip the export."
        ) from exc


def _rename_external_data(temporary: Path, target: Path) -> None:
    """Point the model at `<target>.data` instead of the temporary file's data name."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(temporary))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=f"{target.name}.data")
    onnx.save_model(
        model, str(temporary), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{target.name}.data"
    )
    stale = temporary.parent / f"{temporary.name}.data"
    if stale.exists():
        stale.unlink()


def count_batchnorm_proto(model) -> int:
    """BatchNormalization nodes in an onnx ModelProto's graph and functions."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return sum(1 for n in nodes if n.op_type == "BatchNormalization")


def facts_from_metadata(props: dict[str, str], default_opset: str = "unknown") -> dict[str, str]:
    """Exporter, opset, batch inputs and the batch note from the metadata export_onnx records."""
    return {
        "exporter": props.get(METADATA_EXPORTER, "unknown"),
        "opset": props.get(METADATA_OPSET, default_opset),
        "batch_inputs": props.get(METADATA_BATCH_INPUTS, ""),
        "batch_note": props.get(METADATA_BATCH_NOTE, ""),
    }


def onnx_file_facts(path: str | Path) -> tuple[int, dict[str, str]]:
    """(BatchNormalization op count, exporter/opset) from one read of the file (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return count_batchnorm_proto(model), facts_from_metadata(props, str(model.opset_import[0].version))


def export_info(path: str | Path) -> dict[str, str]:
    """The exporter and opset recorded in an ONNX file's metadata by export_onnx."""
    return onnx_file_facts(path)[1]
