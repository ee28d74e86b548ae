"""Capture a model's BatchNorm calls with the first strategy that works: torch.fx symbolic
tracing, then torch.export, then forward hooks (see `STRATEGIES`); without example inputs,
nothing runs ("modules": discovery judges every BatchNorm module from its constructor arguments).

Capture never mutates the user's model: training flags, attributes set in forward and buffers
(running statistics) are restored afterwards.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import CaptureError
from ..torchutil import as_input_tuple, preserved, require_module
from .calls import BatchNormCall, Capture, one_line, run_eagerly, shape_of
from .export import capture_export
from .fx import capture_fx
from .hooks import capture_hooks

log = logging.getLogger(__name__)

# A capture strategy: (model, input tuple) -> Capture; raising anything but CaptureError moves on.
Strategy = Callable[[nn.Module, tuple], Capture]
STRATEGIES: tuple[tuple[str, Strategy], ...] = (
    ("fx", capture_fx),
    ("export", capture_export),
    ("hooks", capture_hooks),
)
METHODS = tuple(name for name, _ in STRATEGIES)
WITHOUT_INPUTS = "modules"  # the method a capture without example inputs reports


def capture(model: nn.Module, example_inputs: Any, *, methods: Sequence[str] = METHODS) -> Capture:
    """Observe every BatchNorm call of `model` on `example_inputs`, with the first method that works.

    `example_inputs=None` runs nothing: no call is observed, so every BatchNorm module is an
    unreached site, judged from its constructor arguments (functional calls stay unseen).

    Raises:
        CaptureError: the model cannot run on the example inputs at all.
    """
    require_module(model, "capture")
    if example_inputs is None:
        return Capture(WITHOUT_INPUTS, [])
    inputs = as_input_tuple(example_inputs)
    _check_arity(model, inputs)
    reasons: list[str] = []
    strategies = dict(STRATEGIES)
    for method in methods:
        try:
            with preserved(model):
                result = strategies[method](model, inputs)
        except CaptureError:
            raise
        except Exception as exc:  # the strategy failed on the user's model: recorded, reported as NS901
            log.debug("capture with %s failed", method, exc_info=True)
            reasons.append(f"{method}: {one_line(exc)}")
            continue
        result.fallback_reasons = reasons
        result.input_shapes = tuple(shape_of(x) or () for x in inputs)
        return result
    raise CaptureError(f"Could not capture {type(model).__name__}: {'; '.join(reasons)}.")


def _check_arity(model: nn.Module, inputs: tuple) -> None:
    """Refuse example inputs forward does not take (tracing would quietly drop the extra ones)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no Python signature to check: the run will tell
        return
    try:
        signature.bind(*inputs)
    except TypeError as exc:
        raise CaptureError(
            f"{type(model).__name__}.forward does not take the {len(inputs)} example input(s): {exc}; give one input per positional argument."
        ) from None


__all__ = ["METHODS", "STRATEGIES", "WITHOUT_INPUTS", "BatchNormCall", "Capture", "capture", "run_eagerly"]
