"""normswap as Opacus' BatchNorm fixer: after `install()`, `ModuleValidator.fix` and
`ModuleValidator.validate` (so `PrivacyEngine.make_private` too) judge and convert BatchNorm with
normswap; `uninstall()`, or leaving the `with` block, gives Opacus its own back."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from torch import nn

from ..analysis import analyze
from ..calibration import input_batches, model_inputs
from ..context import Context
from ..conversion import Conversion, ConvertOptions, convert_with
from ..policy import resolve_plan
from ..torchutil import require_type
from . import require

log = logging.getLogger(__name__)

# what normswap takes over from Opacus' registries: the fixer and validator Opacus registers for
# torch's BatchNorm classes (module-by-module, keyed by exact type, so blind to subclasses)
_BATCH_NORM_MODULE = "opacus.validators.batch_norm"
# Opacus' own BatchNorm fixer's settings, and what says the same to normswap
_OPACUS_SETTINGS = {
    "num_groups": "max_groups= (normswap caps the group count per layer, keeping at least channels_per_group= channels in a group)",
    "replace_bn_with_in": "to='groupnorm', channels_per_group=1 (InstanceNorm with the BatchNorm's affine carried)",
}


@dataclass(frozen=True)
class OpacusSettings:
    """How an installed normswap fixes and validates models for Opacus.

    options: the conversion settings (`to`, group counts, `keep`, `heal`, ...).
    context: how the model is trained; differential privacy is always on.
    example_inputs: what the model runs on (a tensor or a tuple); None: the first calibration
        batch, else no run at all: every BatchNorm module is judged and replaced from its
        constructor arguments, functional calls are not seen, and of the in-place operations
        Opacus' hooks trip on only `inplace=True` flags are turned off.
    calibration_data: input batches each new layer's affine is fitted on, in any form `convert`
        reads (a DataLoader, a Dataset, a list of batches; labels are dropped). They are used
        outside DP-SGD's privacy accounting: give public data (the pretraining distribution,
        say), never the private training set.
    """

    options: ConvertOptions = dataclasses.field(default_factory=ConvertOptions)
    context: Context = dataclasses.field(default_factory=lambda: Context(differential_privacy=True))
    example_inputs: Any = None
    calibration_data: Any = None

    def __post_init__(self) -> None:
        require_type(self.options, ConvertOptions, "options", "install", "build one with normswap.ConvertOptions(...)")
        require_type(self.context, Context, "context", "install", "build one with normswap.Context(...)")
        if not self.context.differential_privacy:
            object.__setattr__(self, "context", dataclasses.replace(self.context, differential_privacy=True))

    def inputs(self, module: nn.Module, example_inputs: Any = None, calibration_data: Any = None) -> tuple[Any, Any]:
        """(example inputs, calibration data) for one call on `module`: its own, else the
        installed ones; without example inputs, the model's inputs in the first calibration batch."""
        data = calibration_data if calibration_data is not None else self.calibration_data
        example = example_inputs if example_inputs is not None else self.example_inputs
        if example is None and data is not None:
            example = input_batches(data, inputs=model_inputs(module)).head(1)[0]
        return example, data


class Installation:
    """normswap installed into Opacus' `ModuleValidator` (see `install`).

    Attributes:
        settings: what it converts with.
        conversion: the last `ModuleValidator.fix`'s normswap conversion (plan, findings,
            notes, calibration fits, drift), None before the first.
    """

    def __init__(self, settings: OpacusSettings) -> None:
        self.settings = settings
        self.conversion: Conversion | None = None
        self._validator = require("opacus", "opacus").validators.ModuleValidator
        self._saved = {name: self._validator.__dict__[name] for name in ("fix", "validate")}
        self._taken: dict[str, dict[type, Any]] = {"FIXERS": {}, "VALIDATORS": {}}

    def fix(
        self, module: nn.Module, example_inputs: Any = None, calibration_data: Any = None, **kwargs: Any
    ) -> nn.Module:
        """`ModuleValidator.fix(module, **kwargs)` through normswap: a converted copy with every
        BatchNorm site replaced (and calibrated, given calibration data), then Opacus' other
        fixers (LSTM, multi-head attention...). `example_inputs=` / `calibration_data=` override
        the installed ones for this call.

        Raises:
            ValueError: a setting of Opacus' own BatchNorm fixer (`num_groups`, `replace_bn_with_in`).
            NormswapError: a site no target can replace, inputs the model does not take (one sentence).
        """
        for key, instead in _OPACUS_SETTINGS.items():
            if key in kwargs:
                raise ValueError(
                    f"ModuleValidator.fix(..., {key}=...) sets Opacus' own BatchNorm fixer, which normswap replaces while "
                    f"installed; pass {instead} to normswap.integrations.opacus.install(), or uninstall() it."
                )
        example, batches = self.settings.inputs(module, example_inputs, calibration_data)
        conversion = convert_with(
            module, example, self.settings.context, self.settings.options, calibration_data=batches
        )
        self.conversion = conversion
        _log(type(module).__name__, conversion)
        model = conversion.model
        if any(type(m) in self._validator.FIXERS for m in model.modules()):  # Opacus' other fixers (it copies again)
            model = self._saved["fix"].__func__(self._validator, model, **kwargs)
        return model

    def validate(self, module: nn.Module, *, strict: bool = False, example_inputs: Any = None) -> list[Exception]:
        """`ModuleValidator.validate(module, strict=...)` through normswap: Opacus' checks of
        everything but BatchNorm, plus one error per place that normalizes with batch statistics
        in training, found by normswap (subclasses such as timm's `BatchNormAct2d` and
        BatchNorms with frozen affine included), each naming what `fix` puts there. A frozen
        BatchNorm (normswap's `frozen` target, torchvision's `FrozenBatchNorm2d`) is no error.

        Raises:
            UnsupportedModuleError: with `strict`, when there is any error.
        """
        errors = self._saved["validate"].__func__(self._validator, module, strict=False)
        example, _ = self.settings.inputs(example_inputs)
        analysis = analyze(module, example, self.settings.context)
        plan = resolve_plan(
            analysis.sites, analysis.findings, analysis.context, None, self.settings.options.plan_request, strict=False
        )
        opacus = require("opacus", "opacus")
        for finding in analysis.findings:
            if finding.code != "NS106" or finding.site is None:  # NS106: privacy-incompatible
                continue
            entry = plan.get(finding.site.name)
            remedy = (
                f"ModuleValidator.fix (normswap) replaces it with {entry.target}: {entry.reason}."
                if entry is not None and entry.converts
                else f"normswap cannot replace it: {entry.reason if entry is not None else 'it is not planned'}."
            )
            errors.append(opacus.validators.errors.ShouldReplaceModuleError(f"{finding.message} {remedy}"))
        if strict and errors:
            raise opacus.validators.errors.UnsupportedModuleError(errors)
        return errors

    def _enable(self) -> None:
        validator = self._validator
        for registry, taken in self._taken.items():
            table = getattr(validator, registry)
            for cls, function in list(table.items()):
                if getattr(function, "__module__", None) == _BATCH_NORM_MODULE:
                    taken[cls] = table.pop(cls)
        installation = self

        def fix(cls: type, module: nn.Module, **kwargs: Any) -> nn.Module:
            return installation.fix(module, **kwargs)

        def validate(cls: type, module: nn.Module, *, strict: bool = False, **kwargs: Any) -> list[Exception]:
            return installation.validate(module, strict=strict, **kwargs)

        fix.__doc__, validate.__doc__ = Installation.fix.__doc__, Installation.validate.__doc__
        validator.fix, validator.validate = classmethod(fix), classmethod(validate)

    def uninstall(self) -> None:
        """Give Opacus its own `fix`, `validate` and BatchNorm fixer and validator back (twice is harmless)."""
        global _current
        if _current is not self:
            return
        for name, method in self._saved.items():
            setattr(self._validator, name, method)
        for registry, taken in self._taken.items():
            getattr(self._validator, registry).update(taken)
            taken.clear()
        _current = None

    def __enter__(self) -> Installation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.uninstall()


def _log(model: str, conversion: Conversion) -> None:
    """One line for what fix did; the notes that need the user's attention each on their own."""
    counts = ", ".join(f"{n} × {target}" for target, n in conversion.plan.counts().items()) or "nothing to convert"
    made = [note for note in conversion.notes if note.startswith("made out-of-place")]
    log.info(
        "normswap fixed %s for Opacus: %s (captured with %s)%s",
        model,
        counts,
        conversion.capture_method,
        f"; {len(made)} in-place operation(s) made out-of-place for Opacus' hooks" if made else "",
    )
    for note in conversion.notes:
        if note not in made:
            log.warning("normswap: %s", note)


_current: Installation | None = None


def install(
    to: str | None = None,
    *,
    example_inputs: Any = None,
    calibration_data: Iterable[Any] | None = None,
    context: Context | None = None,
    options: ConvertOptions | None = None,
    **settings: Any,
) -> Installation:
    """Make Opacus' `ModuleValidator.fix` and `ModuleValidator.validate` go through normswap.

    `fix` then returns a copy whose BatchNorm sites (modules, subclasses, and with example
    inputs functional calls) are normswap's targets with the weights carried over and normswap's
    group counts, in-place operations on their outputs made out-of-place (opacus#828), and each
    new affine fitted on `calibration_data` when given; `validate` reports every place that
    normalizes with batch statistics, and accepts frozen ones (`to="frozen"`: the running
    statistics become constants, opacus#472).

        with normswap.integrations.opacus.install(example_inputs=x):
            model = ModuleValidator.fix(model)
            model, optimizer, loader = PrivacyEngine().make_private(module=model, ...)

    Args:
        to: the target ("auto": per site, under differential privacy; or a target name);
            default `options.to`.
        example_inputs: what the model runs on; see `OpacusSettings`.
        calibration_data: unlabeled batches of *public* data; see `OpacusSettings`.
        context: the training context (differential privacy is switched on).
        options: the conversion settings; keyword `settings` override single fields (`max_groups`,
            `channels_per_group`, `keep`, `heal`, ...), as in `normswap.convert`.

    Returns:
        The Installation: `.uninstall()`, or use it as a context manager; `.conversion` holds
        the last fix's result.

    Raises:
        ImportError: Opacus is not installed.
        RuntimeError: normswap is already installed (uninstall that one first).
    """
    global _current
    if _current is not None:
        raise RuntimeError(
            "normswap is already installed into Opacus; call uninstall() on that installation first (or use it in a with block)."
        )
    require_type(options, ConvertOptions, "options", "install", "build one with normswap.ConvertOptions(...)")
    options = (options or ConvertOptions()).replace(**settings, **({"to": to} if to is not None else {}))
    installation = Installation(
        OpacusSettings(options, context or Context(), example_inputs=example_inputs, calibration_data=calibration_data)
    )
    installation._enable()
    _current = installation
    return installation


def installed() -> Installation | None:
    """The current installation, if any."""
    return _current


__all__ = ["Installation", "OpacusSettings", "install", "installed"]
