"""Where calibration, healing and validation run: a device chosen once, models moved there for
the work and back afterwards (the user's model ends where it started)."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "cpu", "cuda", "cuda:N", "auto" (or None) or a torch.device.

    "auto" and a bare "cuda" pick this process's local GPU: the one torchrun assigns through
    LOCAL_RANK, else the current one; "auto" falls back to the CPU when there is no GPU.

    Raises:
        ValueError: a device this machine does not have, or a malformed name.
    """
    raw = os.environ.get("LOCAL_RANK", "-1")
    if not raw.strip().lstrip("-").isdigit():
        raise ValueError(f"LOCAL_RANK={raw!r} in the environment is not an integer; unset it or run under torchrun")
    local_rank = int(raw)
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)} or 'cuda:N', got {device!r}.") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "a CUDA device was asked for, but torch sees no GPU on this machine; use the CPU (device 'cpu')."
            )
        index = (
            chosen.index
            if chosen.index is not None
            else (local_rank if local_rank >= 0 else torch.cuda.current_device())
        )
        if index >= torch.cuda.device_count():
            raise ValueError(f"GPU {index} was asked for, but this machine has {torch.cuda.device_count()}.")
        chosen = torch.device("cuda", index)
    return chosen


def device_of(module: nn.Module) -> torch.device:
    return next((t.device for t in itertools.chain(module.parameters(), module.buffers())), torch.device("cpu"))


def _all_on(module: nn.Module, device: torch.device) -> bool:
    """Every tensor of `module` is on `device` already (then `.to()`, which rebuilds every
    parameter slot, is skipped)."""
    return all(t.device == device for t in itertools.chain(module.parameters(), module.buffers()))


@contextlib.contextmanager
def placed(device: torch.device, *modules: nn.Module) -> Iterator[None]:
    """`modules` on `device` for the block, each back on its own device afterwards."""
    origins = [device_of(module) for module in modules]
    moved = [(module, origin) for module, origin in zip(modules, origins, strict=True) if not _all_on(module, device)]
    try:
        for module, _ in moved:
            module.to(device)
        yield
    finally:
        for module, origin in moved:
            module.to(origin)


def to_device(batch: tuple, device: torch.device) -> tuple[Any, ...]:
    """The batch's tensors on `device`, nested lists, tuples and dicts included."""
    return tuple(tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, list(batch)))
