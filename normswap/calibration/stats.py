"""The per-channel least squares calibration solves, from sums streamed batch by batch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChannelSums:
    """Per-channel sums of z, y, z², y² and z·y over every value seen (n per channel), in float64."""

    z: torch.Tensor
    y: torch.Tensor
    zz: torch.Tensor
    yy: torch.Tensor
    zy: torch.Tensor
    n: torch.Tensor

    @classmethod
    def of(cls, zc: torch.Tensor, yc: torch.Tensor) -> ChannelSums:
        """The sums over one batch of normalized outputs and targets as (C, values) float64 matrices."""
        return cls(zc.sum(1), yc.sum(1), _squares(zc), _squares(yc), (zc * yc).sum(1), torch.tensor(float(zc.shape[1])))

    def __add__(self, other: ChannelSums) -> ChannelSums:
        return ChannelSums(
            self.z + other.z,
            self.y + other.y,
            self.zz + other.zz,
            self.yy + other.yy,
            self.zy + other.zy,
            self.n + other.n,
        )


@dataclass(frozen=True)
class EpsSums:
    """A site's ChannelSums for each eps its new layer may normalize with: one z per eps, one y."""

    by_eps: Mapping[float, ChannelSums]

    @classmethod
    def of(cls, normalized: Mapping[float, torch.Tensor], y: torch.Tensor) -> EpsSums:
        yc = _channels_first(y)
        return cls({eps: ChannelSums.of(_channels_first(z), yc) for eps, z in normalized.items()})

    def __add__(self, other: EpsSums) -> EpsSums:
        return EpsSums({eps: sums + other.by_eps[eps] for eps, sums in self.by_eps.items()})


@dataclass(frozen=True)
class AffineFit:
    """y ~ scale * z + shift per channel, and how much of y's variance it explains over all channels."""

    scale: torch.Tensor
    shift: torch.Tensor
    r2: float
    samples: int  # values per channel
    eps: float | None = None  # the eps z was normalized with, when calibration chose it

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.scale.float()).all() and torch.isfinite(self.shift.float()).all())


def fit_affine(s: ChannelSums) -> AffineFit:
    """Per-channel least squares y ~ scale * z + shift from the streamed sums; R^2 over all channels."""
    n = s.n
    mean_z, mean_y = s.z / n, s.y / n
    var_z = s.zz / n - mean_z**2
    cov = s.zy / n - mean_z * mean_y
    var_y = (s.yy / n - mean_y**2).clamp_min(0)
    flat = var_z <= 1e-12  # constant z: only the shift can match
    scale = torch.where(flat, torch.zeros_like(cov), cov / var_z.clamp_min(1e-12))
    shift = mean_y - scale * mean_z
    residual = (var_y - torch.where(flat, torch.zeros_like(cov), cov**2 / var_z.clamp_min(1e-12))).clamp_min(0)
    total = float(var_y.sum())
    r2 = 1.0 - float(residual.sum()) / total if total > 0 else 1.0
    return AffineFit(scale, shift, r2, int(n))


def best_fit(sums: EpsSums, tolerance: float = 1e-3) -> AffineFit:
    """The fit of the smallest eps whose R^2 is within `tolerance` of the best: an eps buys only
    the fit it improves, since a larger one normalizes less."""
    fits = [(eps, fit_affine(s)) for eps, s in sorted(sums.by_eps.items())]
    best = max(fit.r2 for _, fit in fits)
    eps, fit = next((eps, fit) for eps, fit in fits if fit.r2 >= best - tolerance)
    return AffineFit(fit.scale, fit.shift, fit.r2, fit.samples, eps)


def _channels_first(a: torch.Tensor) -> torch.Tensor:
    """A (C, everything else) float64 copy of `a` (channels on dim 1)."""
    return a.transpose(0, 1).to(torch.float64, memory_format=torch.contiguous_format).view(a.shape[1], -1)


def _squares(a: torch.Tensor) -> torch.Tensor:
    """Row-wise sums of squares of a (C, M) matrix, without storing the squares (the fastest form
    measured for wide and narrow layers alike)."""
    return torch.linalg.vector_norm(a, dim=1) ** 2
