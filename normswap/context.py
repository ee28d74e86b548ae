"""How the model will be trained or served; rules judge BatchNorm against it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

DEFAULT_SMALL_BATCH = 16


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
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ConfigError(f"world_size must be a positive integer, got {self.world_size!r}.")
        if not isinstance(self.small_batch_threshold, int) or self.small_batch_threshold < 2:
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
            values[name] = value
        try:
            return cls(**values)
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(f"Invalid {where}: {exc}.") from exc
