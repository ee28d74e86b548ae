"""How close an export must be to PyTorch: relative to each output's own scale, its dtype, and
the model's own rounding error.

An element passes when |ort - torch| <= atol + rtol * |torch|, per output with
    atol = max(ROUNDING_MULTIPLE * rounding, ULPS * eps(dtype) * scale),  rtol = ULPS * eps(dtype)
where scale = max |torch| and rounding = max |model in float64 - model| on the same batch-1
inputs: what the model's own arithmetic at its precision already costs (a deep network
accumulates more than a shallow one, so a correct export of it differs more). Every term scales
with the output, so tiny outputs get tiny tolerances, and an fp16 model is judged at fp16
precision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..torchutil import flat_outputs, preserved

log = logging.getLogger(__name__)

ROUNDING_MULTIPLE = 16  # an export's error may be this many times the model's own rounding error
ULPS = 16  # and always this many units in the last place of the output's dtype, at its scale
MAX_ROUNDING_BYTES = 1 << 30  # above this, no float64 copy of the model is made (memory)


def epsilon(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype; 0 for integer and bool outputs (compared exactly)."""
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


@dataclass
class OutputCheck:
    """One output at one batch size."""

    batch_size: int
    output: int
    dtype: str
    scale: float  # max |torch|
    rounding: float | None  # max |model in float64 - model|, measured at batch 1
    max_abs: float
    max_rel: float
    mean_abs: float
    atol: float
    rtol: float
    needed_atol: float  # smallest atol that would pass at this rtol
    passed: bool
    shape: tuple[int, ...] = ()  # PyTorch's
    onnx_shape: tuple[int, ...] = ()  # onnxruntime's (another shape: a length the data decides, say)


def describe_check(check: OutputCheck) -> str:
    """One output's comparison in a sentence (what a failed check says in the report)."""
    verdict = "ok" if check.passed else "FAILED"
    if check.shape != check.onnx_shape:
        return (
            f"output {check.output} at batch {check.batch_size}: {verdict} (onnxruntime returned shape {check.onnx_shape}, "
            f"PyTorch {check.shape}: the two disagree on a length the model's own predictions decide, or on the output itself)"
        )
    rounding = f"; the model's own float64 rounding {check.rounding:.3g}" if check.rounding is not None else ""
    return (
        f"output {check.output} at batch {check.batch_size}: {verdict} (max abs {check.max_abs:.3g}, max rel {check.max_rel:.3g}, "
        f"mean abs {check.mean_abs:.3g} on a scale of {check.scale:.3g}; atol {check.atol:.3g}, rtol {check.rtol:.3g}{rounding}; "
        f"would pass with atol >= {check.needed_atol:.3g})"
    )


class Rounding:
    """Measures the model's own rounding error: the model itself, switched to float64 for the
    measurement and back (float32 -> float64 -> float32 is exact, and no second copy of the
    weights is held), against its own outputs on the same inputs, per output."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.problem = ""
        size = sum(t.numel() * 8 for t in [*model.parameters(), *model.buffers()])
        if size > MAX_ROUNDING_BYTES:
            self.problem = (
                f"the model's rounding error was not measured: its float64 weights would need {size / 2**30:.1f} GiB"
            )

    def errors_at(self, runs: Sequence[tuple[tuple, list[torch.Tensor]]]) -> list[list[float] | None]:
        """For each (inputs, the model's outputs on them): per output, max |float64 model -
        model|; None where it cannot be measured (`problem` says why)."""
        if self.problem or not runs:
            return [None] * len(runs)
        dtypes = {name: t.dtype for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
        default = torch.get_default_dtype()
        found: list[list[float] | None] = []
        try:
            self.model.double()
            torch.set_default_dtype(torch.float64)  # tensors forward creates itself follow the model
            with torch.no_grad(), preserved(self.model):
                self.model.eval()
                for inputs, outputs in runs:
                    exact = flat_outputs(self.model(*tree_map(_as_float64, list(inputs))))
                    if len(exact) != len(outputs):
                        self.problem = (
                            "the model's rounding error was not measured: in float64 it returns other outputs"
                        )
                        return [None] * len(runs)
                    found.append(
                        [
                            float((e - o.double()).abs().max()) if o.numel() and o.is_floating_point() else 0.0
                            for e, o in zip(exact, outputs, strict=True)
                        ]
                    )
        except (RuntimeError, TypeError, NotImplementedError) as exc:  # an op without a float64 kernel, say
            log.debug("float64 run failed", exc_info=True)
            self.problem = f"the model's rounding error was not measured: it does not run in float64 ({type(exc).__name__}: {str(exc)[:120]})"
            return [None] * len(runs)
        finally:
            torch.set_default_dtype(default)
            _restore_dtypes(self.model, dtypes)
        return found


def _as_float64(x: Any) -> Any:
    """A floating-point tensor in float64 (nested inputs too, as a detector's `[image]`)."""
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _restore_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Each parameter and buffer back to the dtype it had (in place: the same Parameter objects)."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in dtypes and tensor.dtype != dtypes[name]:
                tensor.data = tensor.data.to(dtypes[name])


def compare(
    expected: torch.Tensor,
    actual: np.ndarray,
    batch: int,
    index: int,
    rounding: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> OutputCheck:
    """Compare one ONNX output with PyTorch's (see the module docstring for the tolerances;
    `atol` / `rtol` given explicitly replace the defaults)."""
    eps = epsilon(expected.dtype)
    e = expected.detach().cpu().double().numpy()
    a = np.asarray(actual, dtype=np.float64)
    scale = float(np.abs(e).max()) if e.size else 0.0
    default_atol = max(ROUNDING_MULTIPLE * (rounding or 0.0), ULPS * eps * scale)
    tolerance = default_atol if atol is None else atol
    relative = ULPS * eps if rtol is None else rtol
    dtype = str(expected.dtype).removeprefix("torch.")
    shapes = {"shape": tuple(e.shape), "onnx_shape": tuple(a.shape)}
    if e.shape != a.shape:
        infinite = float("inf")
        return OutputCheck(
            batch,
            index,
            dtype,
            scale,
            rounding,
            infinite,
            infinite,
            infinite,
            tolerance,
            relative,
            infinite,
            False,
            **shapes,
        )
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite ONNX output fails below; no warning on stderr
        error = np.abs(a - e)
        finite = bool(np.isfinite(a).all())
        max_abs = float(error.max()) if error.size else 0.0
        max_rel = float((error / np.maximum(np.abs(e), np.finfo(np.float64).tiny)).max()) if error.size else 0.0
        needed = float(np.maximum(error - relative * np.abs(e), 0).max()) if error.size else 0.0
        passed = finite and bool((error <= tolerance + relative * np.abs(e)).all())
    mean_abs = float(error.mean()) if error.size else 0.0
    return OutputCheck(
        batch, index, dtype, scale, rounding, max_abs, max_rel, mean_abs, tolerance, relative, needed, passed, **shapes
    )


def eval_outputs_exact(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """The model's eval-mode outputs in their own dtype (not cast)."""
    with preserved(model), torch.no_grad():
        model.eval()
        return [t.detach() for t in flat_outputs(model(*inputs))]
