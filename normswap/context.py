"""How the model will be trained or served; rules judge BatchNorm against it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .options import config_keys, from_config, option

DEFAULT_SMALL_BATCH = 16


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Context:
    """Training / serving context.

    Args:
        batch_size: training batch size per device: the micro-batch one forward pass sees, as
            Lightning's and Hugging Face Trainer's per-device batch size (None: unknown).
        world_size: number of data-parallel devices.
        accumulation: gradient accumulation steps: the optimizer steps once every `accumulation`
            micro-batches, so its batch is `batch_size * accumulation` per device; BatchNorm still
            normalizes each micro-batch alone.
        differential_privacy: trained with DP-SGD (e.g. Opacus).
        inference_only: the model is only served, never trained again.
        finetune: fine-tuned from a pretrained checkpoint.
        sequence: inputs are sequences (rank-3 BN inputs are (N, C, L) over time).
        federated: trained by federated clients, each on its own (non-IID) data.
        small_batch_threshold: per-device batch sizes below this count as small.
    """

    batch_size: int | None = option(
        None,
        "--batch-size",
        help="Training batch size per device: the micro-batch one forward pass sees (with --accumulate N the optimizer's "
        "batch is N times this), as Lightning's and Hugging Face Trainer's per-device batch size.",
        config_key="batch_size",
        value_type=int,
        minimum=1,
    )
    world_size: int = option(
        1, "--world-size", help="Number of data-parallel devices.", config_key="world_size", value_type=int, minimum=1
    )
    differential_privacy: bool = option(
        False,
        "--dp",
        help="Trained with differential privacy (DP-SGD).",
        config_key="differential_privacy",
        config_aliases=("dp",),
        value_type=bool,
    )
    inference_only: bool = option(
        False,
        "--inference",
        help="Inference only: never trained again.",
        config_key="inference_only",
        config_aliases=("inference",),
        value_type=bool,
    )
    finetune: bool = option(
        False, "--finetune", help="Fine-tuned from a pretrained checkpoint.", config_key="finetune", value_type=bool
    )
    sequence: bool = option(False, "--sequence", help="Inputs are sequences.", config_key="sequence", value_type=bool)
    federated: bool = option(
        False,
        "--federated",
        help="Trained by federated clients whose data differ (FedAvg, FedBN).",
        config_key="federated",
        value_type=bool,
    )
    accumulation: int = option(
        1,
        "--accumulate",
        help="Gradient accumulation steps: the optimizer steps once every N micro-batches of --batch-size; BatchNorm still "
        "normalizes each micro-batch alone.",
        config_key="accumulation",
        config_aliases=("accumulate",),
        value_type=int,
        minimum=1,
        metavar="N",
    )
    small_batch_threshold: int = option(DEFAULT_SMALL_BATCH, config_key="small_batch_threshold", value_type=int)

    def __post_init__(self) -> None:
        # strict types: in a TOML file `dp = "false"` is a string (true in Python) and
        # `batch_size = true` a bool (1 in Python); both are refused rather than read as something else
        for name in ("differential_privacy", "inference_only", "finetune", "sequence", "federated"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if not _is_int(self.world_size) or self.world_size < 1:
            raise ConfigError(f"world_size must be a positive integer, got {self.world_size!r}.")
        if not _is_int(self.accumulation) or self.accumulation < 1:
            raise ConfigError(f"accumulation must be a positive integer, got {self.accumulation!r}.")
        if not _is_int(self.small_batch_threshold) or self.small_batch_threshold < 2:
            raise ConfigError(
                f"small_batch_threshold must be an integer of at least 2, got {self.small_batch_threshold!r}."
            )

    @property
    def trains(self) -> bool:
        """True when the model will be trained (so training-time batch statistics matter)."""
        return not self.inference_only

    def replace(self, **changes: Any) -> Context:
        """A copy with some fields changed (None values are ignored, so CLI flags can be passed as-is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "context") -> Context:
        """Build from a mapping (e.g. `[tool.normswap]`), rejecting unknown keys by name."""
        known = config_keys(cls)
        unknown = [key for key in data if key.replace("-", "_") not in known]
        if unknown:
            raise ConfigError(f"Unknown key '{unknown[0]}' in {where}; known keys are: {', '.join(sorted(known))}.")
        values: dict[str, Any] = {}
        for key, value in data.items():
            try:
                values.update(from_config(cls, {key: value}, where, check=False))
                cls(**values)  # checked one key at a time, so the message names this key
            except ConfigError as exc:
                raise ConfigError(f"'{key}' in {where}: {str(exc).rstrip('.')}.") from None
        return cls(**values)
