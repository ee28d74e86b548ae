"""Calibration data: checked batches in memory, or one tensor of inputs read from a file."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import CalibrationError
from ..torchutil import pickle_globals, preserved
from .device import device_of, to_device

FORMATS = (".pt", ".pth", ".npy", ".npz", ".safetensors")


def check_model_accepts(
    model: nn.Module,
    batches: Sequence[tuple],
    source: str | None = None,
    *,
    restore: bool = True,
    first_index: int = 0,
) -> None:
    """Run `model` (eval mode, no gradients, state restored) once per distinct batch layout
    (shapes past the batch axis, dtypes), so that data the model cannot take is one sentence
    here rather than a torch error from deep inside calibration, attribution or healing.

    `source` names the file the batches came from, for the message; `first_index` is the first
    batch's index in the user's data; `restore=False` leaves the restoring to a caller that
    already does it.
    """
    seen: set[tuple] = set()
    where = device_of(model)
    with preserved(model) if restore else contextlib.nullcontext(), torch.no_grad():
        model.eval()
        for index, batch in enumerate(batches, start=first_index):
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
        if path.endswith(".npy"):  # memory-mapped: samples are read as batches need them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a read-only map: normswap never writes to it
                tensors = [torch.from_numpy(np.load(path, mmap_mode="r", allow_pickle=False))]
        elif path.endswith(".npz"):
            with np.load(path) as archive:
                arrays = [archive[k] for k in archive.files]
            tensors = [torch.from_numpy(a) for a in arrays]
        elif path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = list(load_file(path).values())
        else:
            obj = _torch_load(path)
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
    data = tensors[0]
    if data.dim() == 0 or data.shape[0] == 0:
        raise CalibrationError(f"Calibration data '{path}' is empty.")
    return data


def _torch_load(path: str) -> Any:
    """torch.load, memory-mapped where the file's format allows (torch.save's zip format)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format


class TensorSamples(Dataset):
    """The samples of one tensor (first axis), in float32 as they are read: a memory-mapped file
    stays on disk but for the batches being used."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index].float()

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        # one gather per batch instead of one indexing per sample (DataLoader's batched fetch)
        return list(self.data[torch.as_tensor(indices)].float())
