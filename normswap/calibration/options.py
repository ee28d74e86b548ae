"""HealOptions: every setting of healing, one object passed from the CLI to the engine."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

HEAL_PARAMS = ("norm", "all")


@dataclass(frozen=True)
class HealOptions:
    """How `heal` distils the converted model toward the original.

    Args:
        steps: optimisation steps at most (0: no healing).
        lr: Adam learning rate (positive, finite).
        params: "norm" (the new normalization layers' parameters) or "all".
        seed: makes the run deterministic (a local generator; torch's global one is not touched).
        heldout_fraction: share of batches kept aside for early stopping.
        patience: evaluations without improvement before stopping.
        eval_every: steps between held-out evaluations.
    """

    steps: int = 0
    lr: float = 1e-3
    params: str = "norm"
    seed: int = 0
    heldout_fraction: float = 0.2
    patience: int = 5
    eval_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"heal steps must be a non-negative integer, got {self.steps!r}.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"heal learning rate must be a positive finite number, got {self.lr!r}.")
        if self.params not in HEAL_PARAMS:
            raise ValueError(f"heal params must be one of {', '.join(HEAL_PARAMS)}, got {self.params!r}.")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}.")
        for name in ("patience", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    def replace(self, **changes: Any) -> HealOptions:
        return dataclasses.replace(self, **changes)
