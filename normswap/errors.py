"""Exceptions normswap raises for input the user can fix; str() is one actionable sentence."""

from __future__ import annotations


class NormswapError(Exception):
    """Base class: a problem with the user's input, described in one sentence."""

    exit_code = 2


class ModelLoadError(NormswapError):
    """A model spec (`pkg.module:callable`, `file.py:callable`) could not be turned into a module."""


class CaptureError(NormswapError):
    """The model cannot run on the example inputs, so nothing about it can be observed."""


class PlanError(NormswapError):
    """A plan cannot be made or applied: unknown target, a site no target can replace, a plan
    that does not match the model."""


class ConfigError(NormswapError, ValueError):
    """Invalid `[tool.normswap]` configuration, command-line option or Context value (a
    ValueError too: `Context(batch_size=0)` is a wrong argument)."""


class CheckpointError(NormswapError):
    """A checkpoint is missing, corrupt, untrusted, or does not fit the model."""


class ExportError(NormswapError):
    """torch.onnx could not export the model, or the file could not be written."""


class ValidationError(NormswapError):
    """An exported file cannot be loaded or run by onnxruntime."""


class CalibrationError(NormswapError):
    """Calibration data does not fit the model, or there is nothing to calibrate."""


class OutputError(NormswapError):
    """An output path cannot be written, or would overwrite something without --force."""


class IntegrationError(NormswapError):
    """normswap is used inside a training library where it cannot do its job (a Lightning
    callback attached after the optimizers hold the BatchNorm's parameters, a checkpoint
    trained with another plan)."""
