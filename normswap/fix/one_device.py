"""Whether a BatchNorm subclass computes what torch's BatchNorm computes on one device (a
synchronized BatchNorm outside a multi-device run): such a class a fix may replace like torch's."""

from __future__ import annotations

import torch
from torch import nn

_VERDICTS: dict[tuple[type, int | None], str] = {}  # one probe per class and rank, in one process


def batchnorm_on_one_device(cls: type[nn.Module], rank: int | None) -> str:
    """The empty string when `cls(C)` computes what torch's BatchNorm computes on one device, in
    training and in eval mode (a synchronized subclass outside a multi-device run); else why not."""
    if (cls, rank) not in _VERDICTS:
        _VERDICTS[(cls, rank)] = _probe(cls, rank)
    return _VERDICTS[(cls, rank)]


def _probe(cls: type[nn.Module], rank: int | None) -> str:
    rank = rank or 4
    reference_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if reference_class is None:
        return f"{cls.__name__} is not compared on rank-{rank} inputs"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((4, 6, *(3,) * (rank - 2)), generator=generator)
    try:
        candidate = cls(6)
        reference = reference_class(6)
        with torch.no_grad():
            for layer in (candidate, reference):  # an affine away from (1, 0), the same in both
                for name, start in (("weight", 0.5), ("bias", -0.5)):
                    parameter = getattr(layer, name)
                    if isinstance(parameter, torch.Tensor):
                        parameter.copy_(torch.linspace(start, start + 1, 6))
            for training in (True, False):
                candidate.train(training)
                reference.train(training)
                # 1e-5: both run torch's batch_norm kernel on the same numbers; anything added differs by far more
                if not torch.allclose(candidate(x), reference(x), rtol=1e-5, atol=1e-5):
                    return f"its output differs from BatchNorm's in {'training' if training else 'eval'} mode"
    except Exception as exc:  # noqa: BLE001 - the user's class failed to build or run: the reason says so
        return f"{cls.__name__}(6) does not build and run as a BatchNorm ({type(exc).__name__}: {str(exc)[:80]})"
    return ""
