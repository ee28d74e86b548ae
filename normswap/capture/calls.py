"""What capture records: one BatchNormCall per place forward uses BatchNorm semantics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import CaptureError
from ..source import SourceLocation
from ..torchutil import preserved


@dataclass
class BatchNormCall:
    """One place in forward where BatchNorm semantics are used, as observed by a capture method."""

    name: str  # module qualified name, or a graph node name ("batch_norm", "batch_norm_1") for functional calls
    module: str | None  # the BN module called; None for a functional call
    owner: str  # qualified name of the module whose forward makes the call ("" = the model)
    input_shape: tuple[int, ...] | None
    called_at: SourceLocation | None
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    # the module whose output is this call's input, and whether nothing else uses that output
    # (known with an FX graph only; fold needs both)
    producer_module: str | None = None
    producer_exclusive: bool = False
    # a rank-3 input only: the layer upstream that shows its last axis is ordered (capture/order.py)
    order: str = ""
    # functional calls only: the `training` flag as traced in train / eval mode, and the arguments.
    training: bool | None = None
    training_in_eval: bool | None = None
    eps: float | None = None
    momentum: float | None = None
    has_running_stats: bool | None = None
    has_affine: bool | None = None
    # functional calls seen running (hooks capture): the tensors passed, without the input
    arguments: Any = None


@dataclass
class Capture:
    """What capture saw: the method used, the graph (if any) and every BatchNorm call."""

    method: str
    calls: list[BatchNormCall]
    graph_module: fx.GraphModule | None = None
    fallback_reasons: list[str] = field(default_factory=list)
    input_shapes: tuple[tuple[int, ...], ...] = ()
    # BatchNorm module -> its tensors forward reads directly, outside the module's own call
    attribute_reads: dict[str, tuple[str, ...]] = field(default_factory=dict)


def shape_of(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    try:
        return tuple(int(d) for d in shape) if shape is not None else None
    except (TypeError, ValueError):  # symbolic dims
        return None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def run_eagerly(model: nn.Module, inputs: tuple) -> Any:
    """Run the model once in eval mode without gradients; a failure is the user's input problem."""
    with preserved(model), torch.no_grad():
        model.eval()
        try:
            return model(*inputs)
        except Exception as exc:  # the user's model failed: one sentence, with the cause
            shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)
            raise CaptureError(
                f"{type(model).__name__} cannot run on example inputs of shape {shapes}: {one_line(exc)}; "
                "check --input-shape (one per model input, batch first)."
            ) from exc
