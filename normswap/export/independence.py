"""Batch independence: is each sample's output the same alone as inside a batch?

Only outputs that carry the batch are judged: an output whose dimension 0 is the batch at both
batch sizes compared. Others (an auxiliary scalar loss, a per-channel tensor, an output whose
length depends on the data) are left out, each with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..postcondition import norms_in_train_mode
from ..torchutil import batch_of, batch_size_of, flat_outputs, preserved, resolve_batch_inputs
from .tolerance import ROUNDING_MULTIPLE


@dataclass
class Independence:
    """The verdict for one mode (None: nothing could be judged) and the outputs left out, with why."""

    independent: bool | None
    left_out: list[str] = field(default_factory=list)


def batch_independent(
    model: nn.Module,
    inputs: tuple,
    train: bool,
    samples: int = 4,
    known: dict[int, list[torch.Tensor]] | None = None,
    batch_inputs: Sequence[int] | None = None,
    rounding: Sequence[float] = (),
) -> Independence:
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
            together = known.get(size) or _outputs(model, batch)
            alone = [
                (known.get(1) if i == 0 else None) or _outputs(model, batch_of(_sample(batch, i, indices), 1, indices))
                for i in range(size)
            ]
        except ValueError:  # BatchNorm refusing a batch of one in train mode
            return Independence(False)
    left_out: list[str] = []
    judged = 0
    for index, output in enumerate(together):
        per_sample = [a[index] for a in alone]
        why = _not_batched(index, output, per_sample, size)
        if why:
            left_out.append(why)
            continue
        judged += 1
        stacked = torch.cat(per_sample)
        scale = float(output.abs().max()) if output.numel() else 0.0
        # without a measured rounding error: the fixed floor of earlier versions (outputs that
        # cancel to ~0 carry rounding noise of their intermediate values, not of their own scale)
        slack = ROUNDING_MULTIPLE * rounding[index] if index < len(rounding) else 1e-5
        if not torch.allclose(stacked, output, rtol=1e-4, atol=slack + 1e-5 * scale):
            return Independence(False, left_out)
    return Independence(True if judged else None, left_out)


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    return [t.float() for t in flat_outputs(model(*inputs))]


def _not_batched(index: int, together: torch.Tensor, alone: list[torch.Tensor], size: int) -> str:
    """Why output `index` cannot be judged sample by sample ("" when it can)."""
    shape, shapes = tuple(together.shape), [tuple(a.shape) for a in alone]
    per_sample = ", ".join(str(s) for s in shapes[:4]) + (", ..." if len(shapes) > 4 else "")
    if shape and all(s and s[1:] == shape[1:] for s in shapes) and sum(s[0] for s in shapes) == shape[0]:
        if all(s[0] == 1 for s in shapes):
            return ""  # dimension 0 is the batch
        return (
            f"output {index} left out: its length depends on the data (shape {shape} at batch {size}, "
            f"{per_sample} per sample), so which rows belong to which sample is not known"
        )
    return f"output {index} left out: it has no batch axis (shape {shape} at batch {size}, {shapes[0]} at batch 1)"


def _sample(batch: tuple, i: int, indices: Sequence[int]) -> tuple:
    return tuple(x[i : i + 1] if index in indices else x for index, x in enumerate(batch))
