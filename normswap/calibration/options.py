"""HealOptions: every setting of healing, one object passed from the CLI to the engine."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..options import option

HEAL_PARAMS = ("all", "norm")
SCHEDULES = ("cosine", "constant")
EPOCHS = 80  # default steps: this many passes over the training part of the data
MIN_STEPS, MAX_STEPS = 200, 2000


@dataclass(frozen=True)
class HealOptions:
    """How `heal` distils the converted model toward the original (defaults measured on the
    benchmark models in the README).

    Args:
        steps: optimisation steps at most; None: 80 passes over the training batches, between
            200 and 2000; 0: no healing.
        lr: Adam learning rate (positive, finite).
        params: "all" (every floating parameter; needed where a swap removes information a
            per-channel affine cannot restore, e.g. LayerNorm over MLP features) or "norm" (the
            new normalization layers' affine only: lighter, enough for conv nets).
        schedule: "cosine" (decay to 0 over `steps`) or "constant".
        mixup: distil on random mixtures of two batches labelled by the original (more inputs
            than the calibration data holds), or on the batches as they are.
        seed: makes the run deterministic (a local generator; torch's global one is not touched).
        heldout_fraction: share of batches kept aside for early stopping.
        patience: held-out evaluations without improvement before stopping.
        eval_every: steps between held-out evaluations (None: `steps` / 50, at least 5).
    """

    steps: int | None = option(
        None,
        "--heal-steps",
        help="Healing steps (implies --heal; default: 80 passes over the training batches, 200 to 2000).",
        value_type=int,
        minimum=1,
    )
    lr: float = option(
        1e-3,
        "--heal-lr",
        help="Healing learning rate (implies --heal; default 1e-3, cosine decay).",
        value_type=float,
        minimum=0,
        open_minimum=True,
        finite=True,
    )
    params: str = option(
        "all", "--heal-params", help="Parameters healing trains (implies --heal; default: all).", choices=HEAL_PARAMS
    )
    schedule: str = "cosine"
    seed: int = 0
    heldout_fraction: float = 0.2
    mixup: bool = True
    patience: int = 25
    eval_every: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"heal steps must be a positive integer, got {self.steps!r}.")
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not math.isfinite(self.lr)
            or self.lr <= 0
        ):
            raise ValueError(f"heal learning rate must be a positive finite number, got {self.lr!r}.")
        if self.params not in HEAL_PARAMS:
            raise ValueError(f"heal params must be one of {', '.join(HEAL_PARAMS)}, got {self.params!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"heal schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}.")
        for name in ("patience", "eval_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    def replace(self, **changes: Any) -> HealOptions:
        return dataclasses.replace(self, **changes)

    def resolved_steps(self, train_batches: int) -> int:
        """The number of steps for `train_batches` batches of training data."""
        if self.steps is not None:
            return self.steps
        return max(MIN_STEPS, min(MAX_STEPS, EPOCHS * train_batches))

    def resolved_eval_every(self, steps: int) -> int:
        return self.eval_every if self.eval_every is not None else max(5, steps // 50)
