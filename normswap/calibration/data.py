"""Calibration data: checked batches in memory, or one tensor of inputs read from a file."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CalibrationError
from ..torchutil import as_input_tuple

FORMATS = (".pt", ".pth", ".npy", ".npz", ".safetensors")


def check_batches(batches: Iterable[Any]) -> list[tuple]:
    """Materialize and check calibration batches: non-empty, finite tensors."""
    checked = [as_input_tuple(b) for b in batches]
    if not checked:
        raise CalibrationError("Calibration data is empty; give at least one batch of inputs.")
    for index, batch in enumerate(checked):
        for x in batch:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
                raise CalibrationError(f"Calibration batch {index} holds NaN or infinite values; clean the data first.")
    return checked


def batches_from_tensor(data: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)]


def load_calibration_tensor(path: str) -> torch.Tensor:
    """Inputs from a .pt / .npz / .safetensors file holding one tensor (first axis = samples)."""
    if not os.path.isfile(path):
        raise CalibrationError(f"Calibration data '{path}' does not exist.")
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
            f"Calibration data '{path}' could not be read as {Path(path).suffix} ({str(exc).splitlines()[0][:160]}); "
            "check that it was written by the tool its name says."
        ) from exc
    if len(tensors) != 1:
        raise CalibrationError(f"Calibration data '{path}' must hold exactly one tensor of inputs, found {len(tensors)}.")
    data = tensors[0].float()
    if data.dim() == 0 or data.shape[0] == 0:
        raise CalibrationError(f"Calibration data '{path}' is empty.")
    return data
