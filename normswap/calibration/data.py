"""Calibration data: checked batches in memory, or one tensor of inputs read from a file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CalibrationError
from ..torchutil import as_input_tuple, pickle_globals, preserved
from .device import device_of, to_device

FORMATS = (".pt", ".pth", ".npy", ".npz", ".safetensors")


def check_batches(batches: Iterable[Any]) -> list[tuple]:
    """Materialize and check calibration batches: non-empty, finite tensors."""
    checked = [as_input_tuple(b) for b in batches]
    if not checked:
        raise CalibrationError("Calibration data is empty; give at least one batch of inputs.")
    for index, batch in enumerate(checked):
        for x in batch:
            if isinstance(x, torch.Tensor) and x.is_complex():
                raise CalibrationError(
                    f"Calibration batch {index} holds complex values; the model's inputs are real numbers."
                )
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
                raise CalibrationError(f"Calibration batch {index} holds NaN or infinite values; clean the data first.")
    return checked


def check_model_accepts(
    model: nn.Module, batches: Sequence[tuple], source: str | None = None, *, restore: bool = True
) -> None:
    """Run `model` (eval mode, no gradients, state restored) once per distinct batch layout
    (shapes past the batch axis, dtypes), so that data the model cannot take is one sentence
    here rather than a torch error from deep inside calibration, attribution or healing.

    `source` names the file the batches came from, for the message; `restore=False` leaves the
    restoring to a caller that already does it.
    """
    seen: set[tuple] = set()
    where = device_of(model)
    with preserved(model) if restore else contextlib.nullcontext(), torch.no_grad():
        model.eval()
        for index, batch in enumerate(batches):
            layout = tuple((tuple(x.shape[1:]), x.dtype) if isinstance(x, torch.Tensor) else type(x) for x in batch)
            if layout in seen:
                continue
            seen.add(layout)
            try:
                with contextlib.suppress(Exception):  # one sample tells most data apart at a fraction of the cost
                    model(*to_device(_first_sample(batch), where))
                    continue
                model(*to_device(batch, where))  # a model that needs the whole batch (a fixed batch size), or the error
            except Exception as exc:  # the user's model on the user's data: whatever it raises is the data's problem
                shapes = ", ".join(str(tuple(x.shape)) for x in batch if isinstance(x, torch.Tensor))
                what = (
                    f"Calibration data '{source}' of shape {shapes} (per batch)"
                    if source
                    else f"Calibration batch {index} of shape {shapes}"
                )
                cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                raise CalibrationError(
                    f"{what} does not fit the model: {cause}; give inputs the model accepts, batch first, like the example inputs."
                ) from exc


def _first_sample(batch: tuple) -> tuple:
    """The batch cut to its first sample: every tensor whose first dimension is the batch's."""
    size = next((x.shape[0] for x in batch if isinstance(x, torch.Tensor) and x.dim()), None)
    return tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == size else x for x in batch)


def _reason(exc: Exception, path: Path) -> str:
    """The reader's complaint in a few words (torch's weights_only message is a paragraph)."""
    text = str(exc)
    if "Weights only load failed" in text or "Unsupported global" in text:
        names = pickle_globals(path)
        if names:
            return f"it holds Python objects ({', '.join(names[:3])}), which normswap does not load from data files; save a plain tensor"
        return "not a torch.save file, or a truncated one"
    if any(
        mark in text
        for mark in (
            "invalid load key",
            "Invalid magic number",
            "failed finding central directory",
            "PytorchStreamReader",
        )
    ):
        return "not a torch.save file, or a truncated one"
    return text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__


def batches_from_tensor(data: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)]


def load_calibration_tensor(path: str) -> torch.Tensor:
    """Inputs from a .pt / .npz / .safetensors file holding one tensor (first axis = samples)."""
    if os.path.isdir(path):
        raise CalibrationError(f"Calibration data '{path}' is a directory; give the tensor file inside it.")
    if not os.path.exists(path):
        raise CalibrationError(f"Calibration data '{path}' does not exist.")
    if not os.path.isfile(path):
        raise CalibrationError(
            f"Calibration data '{path}' is not a regular file (a pipe or device?); give a saved tensor file."
        )
    if not path.endswith(FORMATS):
        raise CalibrationError(
            f"Calibration data '{path}' is not a tensor file normswap reads; save the inputs (first axis = samples) as "
            ".pt / .pth (torch.save of one tensor), .npy, .npz or .safetensors."
        )
    try:
        if path.endswith(".npy"):
            tensors = [torch.from_numpy(np.load(path, allow_pickle=False))]
        elif path.endswith(".npz"):
            with np.load(path) as archive:
                arrays = [archive[k] for k in archive.files]
            tensors = [torch.from_numpy(a) for a in arrays]
        elif path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = list(load_file(path).values())
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            tensors = (
                [obj]
                if isinstance(obj, torch.Tensor)
                else [v for v in (obj.values() if isinstance(obj, dict) else obj) if isinstance(v, torch.Tensor)]
            )
    except Exception as exc:  # any reader failure is the file's problem: one sentence, with the cause
        raise CalibrationError(
            f"Calibration data '{path}' could not be read as {Path(path).suffix} ({_reason(exc, Path(path))}); check that it was written by the tool its name says."
        ) from exc
    if len(tensors) != 1:
        raise CalibrationError(
            f"Calibration data '{path}' must hold exactly one tensor of inputs, found {len(tensors)}."
        )
    if tensors[0].is_complex() or tensors[0].dtype == torch.bool:
        raise CalibrationError(
            f"Calibration data '{path}' holds {str(tensors[0].dtype).removeprefix('torch.')} values; the model's inputs are real numbers."
        )
    data = tensors[0].float()
    if data.dim() == 0 or data.shape[0] == 0:
        raise CalibrationError(f"Calibration data '{path}' is empty.")
    return data
