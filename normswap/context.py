"""How the model will be trained or served; rules judge BatchNorm against it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

DEFAULT_SMALL_BATCH = 16


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Context:
    """Training / serving context.

    Args:
        batch_size: training batch size per device (None: unknown).
        world_size: number of data-parallel devices.
        differential_privacy: trained with DP-SGD (e.g. Opacus).
        inference_only: the model is only served, never trained again.
        finetune: fine-tuned from a pretrained checkpoint.
        sequence: inputs are sequences (rank-3 BN inputs are (N, C, L) over time).
        small_batch_threshold: per-device batch sizes below this count as small.
    """

    batch_size: int | None = None
    world_size: int = 1
    differential_privacy: bool = False
    inference_only: bool = False
    finetune: bool = False
    sequence: bool = False
    small_batch_threshold: int = DEFAULT_SMALL_BATCH

    def __post_init__(self) -> None:
        # strict types: in a TOML file `dp = "false"` is a string (true in Python) and
        # `batch_size = true` a bool (1 in Python); both are refused rather than read as something else
        for name in ("differential_privacy", "inference_only", "finetune", "sequence"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if not _is_int(self.world_size) or self.world_size < 1:
            raise ConfigError(f"world_size must be a positive integer, got {self.world_size!r}.")
        if not _is_int(self.small_batch_threshold) or self.small_batch_threshold < 2:
            raise ConfigError(f"small_batch_threshold must be an integer of at least 2, got {self.small_batch_threshold!r}.")

    @property
    def trains(self) -> bool:
        """True when the model will be trained (so training-time batch statistics matter)."""
        return not self.inference_only

    def replace(self, **changes: Any) -> Context:
        """A copy with some fields changed (None values are ignored, so CLI flags can be passed as-is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "context") -> Context:
        """Build from a mapping (e.g. `[tool.normswap]`), rejecting unknown keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        aliases = {"dp": "differential_privacy", "inference": "inference_only"}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
            if name not in names:
                raise ConfigError(f"Unknown key '{key}' in {where}; known keys are: {', '.join(sorted(names))}.")
            try:
                cls(**{name: value})  # checked alone, so the message names this key
            except ConfigError as exc:
                raise ConfigError(f"'{key}' in {where}: {str(exc).rstrip('.')}.") from None
            values[name] = value
        return cls(**values)
