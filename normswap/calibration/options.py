"""HealOptions: every setting of healing, one object passed from the CLI to the engine."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..options import option

HEAL_PARAMS = ("all", "norm")
LOSSES = ("kl", "mse")  # heldout.distillation_loss
SCHEDULES = ("cosine", "constant")
MAX_PASSES = 80  # over the training part of small data
MAX_IMAGES = 65_536  # training samples seen at most by default: about 80 passes over 1k samples, 6 over 10k
MIN_STEPS = 200  # small data: at least this many steps, the passes notwithstanding
BASE_LR = 1e-3  # the healing rate of a network with up to SHALLOW_SITES converted sites
# Deeper, it is BASE_LR * SHALLOW_SITES / sites: one Adam step moves every parameter by about the
# rate, and the output's change sums over the sites it passes through. ResNet-56 (55 sites) kept its
# calibrated model at 1e-3 and healed at 3e-4; ResNet-20 (19) heals best at 1e-3 (README).
SHALLOW_SITES = 20


@dataclass(frozen=True)
class HealOptions:
    """How `heal` distils the converted model toward the original (defaults measured on the
    benchmark models in the README).

    Args:
        steps: optimisation steps at most; None: until held-out agreement stops improving, at
            most 80 passes over the training data or 65,536 samples seen, whichever is fewer
            (at least 200 steps), or the budget.
        budget: minutes healing may take at most (None: no limit); the learning-rate schedule
            spreads over the budget when it binds before the steps do.
        lr: Adam learning rate of the new normalization layers' affine (positive, finite); the
            other parameters train at a third of it. None: 1e-3, scaled down by depth beyond 20
            converted sites (1e-3 * 20 / sites: 3.6e-4 on ResNet-56's 55; `resolved_lr`).
        params: "all" (every floating parameter; needed where a swap removes information a
            per-channel affine cannot restore) or "norm" (the new normalization layers' affine
            only: lighter).
        loss: on class scores, "kl" (KL between the softmaxes: what keeps the top-1 on the
            small networks, where matching the logits moved the tabular MLP's held-out agreement
            down and never back) or "mse" (the logits themselves: on ResNet-20, 94.3 % test
            agreement after the default 512 steps against 93.6 % with KL; README). Other outputs:
            MSE either way.
        hints: also match the output of every converted site to the original BatchNorm's output
            (feature hints): a signal at every depth, not only at the model's outputs. Off by
            default: on ResNet-20 it added 0.5 points of agreement in 200 steps with KL and 0.1
            with "mse", for 24 % more per step (README).
        schedule: "cosine" (decay to 0 over the planned steps, after a short warm-up) or "constant".
        mixup: distil on random mixtures of two batches labelled by the original (more inputs
            than the data holds), or on the batches as they are.
        seed: makes the run deterministic (a local generator; torch's global one is not touched).
        heldout: samples kept aside to judge healing (None: a fifth of the data, at most 2,048).
        patience: held-out evaluations without improvement before stopping.
        eval_every: steps between held-out evaluations (None: about 20 evaluations over the
            planned steps, at most every 5 steps: on ResNet-20 one evaluation of 2,048 samples
            costs about four steps).
    """

    steps: int | None = option(
        None,
        "--heal-steps",
        help="Healing steps at most (implies --heal; default: until held-out agreement stops improving).",
        value_type=int,
        minimum=1,
    )
    budget: float | None = option(
        None,
        "--heal-budget",
        help="Minutes healing may take at most (implies --heal; default: no limit).",
        value_type=float,
        minimum=0,
        open_minimum=True,
        finite=True,
        metavar="MINUTES",
    )
    lr: float | None = option(
        None,
        "--heal-lr",
        help="Healing learning rate of the new layers (implies --heal; default 1e-3, times 20/sites beyond 20 converted sites; the other weights a third of it; cosine decay).",
        value_type=float,
        minimum=0,
        open_minimum=True,
        finite=True,
    )
    params: str = option(
        "all", "--heal-params", help="Parameters healing trains (implies --heal; default: all).", choices=HEAL_PARAMS
    )
    loss: str = option(
        "kl",
        "--heal-loss",
        help="Distillation loss on class scores (implies --heal; default kl; mse matches the logits: better on ResNet-20, README).",
        choices=LOSSES,
    )
    hints: bool = False
    schedule: str = "cosine"
    seed: int = 0
    heldout: int | None = None
    mixup: bool = True
    patience: int = 8
    eval_every: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"heal steps must be a positive integer, got {self.steps!r}.")
        if self.lr is not None and (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not math.isfinite(self.lr)
            or self.lr <= 0
        ):
            raise ValueError(f"heal learning rate must be a positive finite number, got {self.lr!r}.")
        if self.params not in HEAL_PARAMS:
            raise ValueError(f"heal params must be one of {', '.join(HEAL_PARAMS)}, got {self.params!r}.")
        if self.loss not in LOSSES:
            raise ValueError(f"heal loss must be one of {', '.join(LOSSES)}, got {self.loss!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"heal schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if self.budget is not None and (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, (int, float))
            or not math.isfinite(self.budget)
            or self.budget <= 0
        ):
            raise ValueError(f"heal budget must be a positive number of minutes, got {self.budget!r}.")
        if self.heldout is not None and (
            isinstance(self.heldout, bool) or not isinstance(self.heldout, int) or self.heldout < 0
        ):
            raise ValueError(f"heldout must be a number of samples (0 or more), got {self.heldout!r}.")
        for name in ("patience", "eval_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    def replace(self, **changes: Any) -> HealOptions:
        return dataclasses.replace(self, **changes)

    def planned_steps(self, batches_per_pass: int | None, batch_size: int) -> int:
        """The steps healing plans for (the schedule's length): `steps`, else 80 passes over
        `batches_per_pass` training batches (None: a stream of unknown length) or 65,536 samples
        in batches of `batch_size`, whichever is fewer, and at least 200."""
        if self.steps is not None:
            return self.steps
        by_images = MAX_IMAGES // max(1, batch_size)
        by_passes = MAX_PASSES * batches_per_pass if batches_per_pass is not None else by_images
        return max(MIN_STEPS, min(by_passes, by_images))

    def resolved_lr(self, sites: int) -> float:
        """The learning rate healing runs at on a model with `sites` converted normalization
        layers: `lr`, else BASE_LR scaled down by depth beyond SHALLOW_SITES."""
        if self.lr is not None:
            return self.lr
        return BASE_LR * min(1.0, SHALLOW_SITES / max(1, sites))

    def heldout_samples(self, samples: int | None) -> int:
        """How many samples to hold out of `samples` (None: unknown)."""
        if self.heldout is not None:
            return self.heldout
        return min(2048, samples // 5) if samples is not None else 1024

    def resolved_eval_every(self, steps: int) -> int:
        if self.eval_every is not None:
            return self.eval_every
        return max(5, steps // 20)
