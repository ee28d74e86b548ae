"""What a target is: its plan parameters and their checks, the module it builds, its functional
form (used for functional sites and inside BatchNorm subclasses), its calibration hook, and
whether it keeps the original function or batch statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..capture.tracer import BatchNormArgs
from ..errors import PlanError
from ..sites import Site
from .takeover import is_subclass_instance, take_over

DEFAULT_MAX_GROUPS = 32
DEFAULT_CHANNELS_PER_GROUP = 16  # Wu & He: a fixed number of channels per group trains as well as G = 32


class Refusal(PlanError):
    """A target cannot replace one site; the message says why and what to do instead."""


@dataclass(frozen=True)
class PlanOptions:
    """Choices that shape a target's parameters (e.g. GroupNorm's group count)."""

    max_groups: int = DEFAULT_MAX_GROUPS
    channels_per_group: int = DEFAULT_CHANNELS_PER_GROUP

    def __post_init__(self) -> None:
        for name in ("max_groups", "channels_per_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class ParamKind(enum.Enum):
    """The type of a plan parameter's value in plan.json."""

    INT = "int"
    FLOAT = "float"
    OPTIONAL_FLOAT = "float or null"
    BOOL = "bool"
    STR = "str"


@dataclass(frozen=True)
class Param:
    """One plan parameter: its type and whether a plan entry must give it."""

    kind: ParamKind
    required: bool = True
    positive: bool = False
    choices: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why `value` is not acceptable, or None."""
        if self.kind is ParamKind.BOOL:
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind is ParamKind.STR:
            if not isinstance(value, str):
                return "must be a string"
            return None if not self.choices or value in self.choices else f"must be one of {', '.join(self.choices)}"
        if self.kind is ParamKind.OPTIONAL_FLOAT and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return "must be a number"
        try:
            number = float(value)
        except OverflowError:
            return "is out of range"
        if self.kind is ParamKind.INT and not number.is_integer():
            return "must be an integer"
        if not math.isfinite(number):
            return "must be finite"
        if self.positive and value <= 0:
            return "must be positive"
        if value < 0:
            return "must not be negative"
        return None


def param(kind: ParamKind, *, required: bool = True, positive: bool = False, choices: tuple[str, ...] = ()) -> Any:
    """A field of a target's parameter dataclass, with the Param spec plan files are checked
    against (an optional parameter is None when a plan does not give it)."""
    metadata = {"param": Param(kind, required, positive, choices)}
    return dataclasses.field(metadata=metadata) if required else dataclasses.field(default=None, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class TargetParams(Mapping[str, Any]):
    """A target's plan parameters, typed; also a read-only mapping of the parameters a plan gives
    (what plan.json holds: required fields, and optional ones that are set)."""

    @classmethod
    def specs(cls) -> dict[str, Param]:
        """Each parameter's spec, the target's own parameters first (the order plan.json shows)."""
        return _specs(cls)

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Self:
        """The typed parameters of checked plan values (`Target.check`); ints read as ints."""
        if isinstance(values, cls):
            return values
        typed = {}
        for name, spec in cls.specs().items():
            value = values.get(name)
            if value is not None and spec.kind is ParamKind.INT:
                value = int(value)
            elif value is not None and spec.kind in (ParamKind.FLOAT, ParamKind.OPTIONAL_FLOAT):
                value = float(value)
            typed[name] = value
        return cls(**typed)

    def __getitem__(self, key: str) -> Any:
        if key not in self.specs() or (getattr(self, key) is None and not self.specs()[key].required):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, spec in self.specs().items() if spec.required or getattr(self, name) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)


@functools.cache
def _specs(params_type: type[TargetParams]) -> dict[str, Param]:
    fields = {f.name: f for f in dataclasses.fields(params_type)}
    own_first = [name for klass in params_type.__mro__ for name in inspect.get_annotations(klass) if name in fields]
    return {name: fields[name].metadata["param"] for name in dict.fromkeys(own_first)}


@dataclass(frozen=True, kw_only=True)
class NoParams(TargetParams):
    """A target that takes no parameters."""


@dataclass(frozen=True, kw_only=True)
class NormParams(TargetParams):
    """What every normalization target keeps of the BatchNorm: its eps and whether it has an affine."""

    eps: float = param(ParamKind.FLOAT, positive=True)
    affine: bool = param(ParamKind.BOOL)


@dataclass(frozen=True)
class SourceCode:
    """Code a source fix writes, the modules it needs imported, and the module-level functions it
    calls that the fix defines in the file (name, definition), once per file."""

    text: str
    imports: tuple[str, ...] = ()
    helpers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SourceCall:
    """How the user's source builds or calls BatchNorm, for a target to write its own form:
    each argument's code by parameter name (a constructor's `num_features`, `eps`, `affine`...;
    a functional call's `input`, `running_mean`...), how the file reaches the torch namespace
    the call used (`nn.`, `F.`), the whole call as written, and the options the plan was made
    with (a rule written into the source must give every width what the plan gives)."""

    arguments: Mapping[str, str]
    namespace: str
    imports: tuple[str, ...] = ()
    written: str = ""
    callee: str = ""
    options: PlanOptions | None = None  # what the plan was made with, when known

    def keywords(self, renames: Mapping[str, str] | None = None) -> str:
        """', eps=1e-3, affine=False': the arguments that keep their meaning, as written."""
        renames = renames or {}
        return "".join(
            f", {renames.get(name, name)}={self.arguments[name]}"
            for name in ("eps", "affine", "device", "dtype")
            if name in self.arguments
        )


NORMSWAP_NN = "normswap.nn"  # where the drop-ins live, for fixed source code


P = TypeVar("P", bound=TargetParams)


class Target(Generic[P]):
    """Base class of a replacement for BatchNorm; one subclass per module of this package. `P`:
    its parameter dataclass (`params_type`); its methods take the parameters of one plan entry."""

    name: ClassVar[str]
    summary: ClassVar[str]
    keeps_function: ClassVar[bool] = False  # the eval-mode function is kept exactly (a safe fix)
    batch_statistics: ClassVar[bool] = False  # the result still normalizes with batch statistics
    keeps_batchnorm_op: ClassVar[bool] = False  # its ONNX export may hold BatchNormalization ops
    converts: ClassVar[bool] = True  # it replaces the BatchNorm's semantics (keep does not); `--to` offers it
    fallback: ClassVar[str | None] = None  # takes a site this one refuses, keeping what was asked for (fold -> frozen)
    # under auto, the next candidate where this target refuses a site (default: `fallback`)
    auto_fallback: ClassVar[str | None] = None
    calibrated: ClassVar[bool] = False  # `normalize` is defined: calibration fits its affine
    absorbs_affine: ClassVar[bool] = (
        False  # the site's affine moves into another layer (fold), not into its replacement
    )
    # it may put torch's own BatchNorm in place of a subclass's whole forward (batchnorm), so a
    # subclass computing its statistics by hand is no obstacle: its `plan` decides
    replaces_forward: ClassVar[bool] = False
    params_type: type[P]

    @property
    def parameters(self) -> dict[str, Param]:
        """Each plan parameter's spec, read off the parameter dataclass."""
        return self.params_type.specs()

    def typed(self, params: Mapping[str, Any]) -> P:
        """A plan entry's parameters as this target's dataclass (checked first by `check`)."""
        return self.params_type.of(params)

    def uses_batch_statistics(self, params: P) -> bool:
        """Whether a site planned this way still normalizes with batch statistics."""
        return self.batch_statistics

    # --- planning -------------------------------------------------------------------------

    def unchanged(self, site: Site) -> str | None:
        """Why `site` already is what this target builds (an explicit `--to` then keeps it, with
        this reason); None when there is something to replace."""
        return None

    def plan(self, site: Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        """Parameters for replacing `site`, and what chose them (appended to the plan reason).

        Raises:
            Refusal: this target cannot replace the site (the sentence says what to use instead).
        """
        raise NotImplementedError

    def check(self, site_name: str, params: Mapping[str, Any], site: Site | None = None) -> None:
        """Check a plan entry's parameters (types, ranges, and against the site when known).

        Raises:
            PlanError: naming the site and the field.
        """
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            takes = ", ".join(self.parameters) or "no parameters"
            raise PlanError(
                f"Plan entry '{site_name}' ({self.name}) has unknown parameter '{unknown[0]}'; {self.name} takes {takes}."
            )
        for field, spec in self.parameters.items():
            if field not in params:
                if spec.required:
                    raise PlanError(f"Plan entry '{site_name}' ({self.name}) lacks the parameter '{field}'.")
                continue
            problem = spec.problem(params[field])
            if problem:
                raise PlanError(f"Plan entry '{site_name}' ({self.name}): '{field}' {problem}, got {params[field]!r}.")
        if site is not None:
            self.check_against_site(site_name, params, site)

    def check_against_site(self, site_name: str, params: Mapping[str, Any], site: Site) -> None:
        """Extra checks that need the site: the channel count; whether this target can replace
        the site at all (what planning would refuse, a plan file cannot force); for targets that
        keep the function, the site's own eps."""
        channels = params.get("num_channels", params.get("num_features"))
        if channels is not None and site.num_features is not None and int(channels) != site.num_features:
            raise PlanError(
                f"Plan entry '{site_name}' expects {int(channels)} channels but the model's layer has {site.num_features}; "
                "the plan was made for another configuration of this model."
            )
        try:
            self.plan(site, PlanOptions())
        except Refusal as refusal:
            raise PlanError(f"Plan entry '{site_name}' ({self.name}) does not fit the model: {refusal}") from None
        if self.keeps_function and "eps" in params and not math.isclose(float(params["eps"]), site.eps, rel_tol=1e-9):
            raise PlanError(
                f"Plan entry '{site_name}' ({self.name}) has eps {params['eps']!r} but the layer's is {site.eps!r}; "
                f"{self.name} keeps the layer's function only with its own eps."
            )

    # --- rewriting ------------------------------------------------------------------------

    def replace(self, bn: _BatchNorm, params: P, name: str) -> nn.Module:
        """The module that takes `bn`'s place (the swap pass carries hooks and attributes over):
        for torch's own classes, `module`; for a subclass, a module of its class taken over by
        this target (see takeover.py).

        Raises:
            PlanError: the layer cannot be replaced (named in the sentence).
        """
        if is_subclass_instance(bn):
            return take_over(bn, self, params, name)
        return self.module(bn, params)

    def module(self, bn: _BatchNorm, params: P) -> nn.Module:
        """The replacement for a torch BatchNorm module, built in its dtype and on its device,
        with its weights carried over."""
        raise PlanError(f"Target '{self.name}' does not build a module.")

    def takeover_base(self, params: P) -> type:
        """The class that stands where torch's BatchNorm was when a BatchNorm subclass is taken
        over (see takeover.py): a TakenOver module of this target's kind whose `forward(x)`
        computes the target (what the subclass's `super().forward(x)` reaches)."""
        raise PlanError(f"Target '{self.name}' cannot take over a BatchNorm subclass.")

    def function(self, params: P, call: BatchNormArgs) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The functional form: (a module-level function, its arguments) computing this target
        from the arguments of one `batch_norm` call. Values may be tensors or graph nodes."""
        raise PlanError(f"Target '{self.name}' has no functional form.")

    def prepare_takeover(self, module: nn.Module, params: P) -> None:
        """Adjust a taken-over subclass instance (it holds the BatchNorm's state) to its new class.

        Default (per-sample normalizations): drop the running statistics, which no longer mean
        anything, so that they leave the state_dict as they do for swapped modules.
        """
        drop_statistics(module)

    def export_context(self, model: nn.Module, opset: int) -> contextlib.AbstractContextManager[None]:
        """What holds while `model` is exported to ONNX at `opset` (the form this target's
        modules export in); nothing by default."""
        return contextlib.nullcontext()

    def absorb(self, model: nn.Module, site_name: str, statistics: Any, params: P) -> None:
        """Change other parts of `model` before the site is replaced (fold changes its producer).

        `statistics` has the site's running_mean, running_var, weight and bias: the BatchNorm
        module, or for a functional call the tensors it passes.
        """

    # --- source code (normswap lint --fix) ------------------------------------------------
    # Each returns the code, or a sentence saying why this target has no such form. `params`:
    # the plan parameters of every site built at that place in the source (one or several).

    def source_call(self, call: SourceCall, params: Sequence[P]) -> SourceCode | str:
        """What replaces a BatchNorm constructor call (`nn.BatchNorm2d(64, eps=1e-3)`)."""
        return f"the {self.name} target has no form in source code"

    def source_class(self, call: SourceCall, params: Sequence[P]) -> SourceCode | str:
        """What replaces a BatchNorm class passed as a value (`norm_layer=nn.BatchNorm2d`): a
        class or factory taking BatchNorm's constructor arguments."""
        return f"the {self.name} target has no form in source code"

    def source_sync_conversion(self, call: SourceCall, params: Sequence[P]) -> SourceCode | str:
        """What replaces `nn.SyncBatchNorm.convert_sync_batchnorm(module)` (or timm's), which made
        the layers out of BatchNorm layers the source builds elsewhere (argument: `module`)."""
        return (
            f"made by `{call.callee}(...)` out of BatchNorm layers built elsewhere; the {self.name} fix belongs where "
            "they are built: lint the model without the conversion"
        )

    def source_function(self, call: SourceCall, params: P) -> SourceCode | str:
        """What replaces a functional `batch_norm(input, running_mean, running_var, weight, bias,
        training, momentum, eps)` call (arguments by those names)."""
        return f"the {self.name} target has no form in source code"

    # --- calibration ----------------------------------------------------------------------

    def normalize(self, params: P, x: torch.Tensor) -> torch.Tensor | None:
        """The replacement's output before its per-channel affine (calibration fits that affine);
        None when the target is not calibrated (it keeps the function, or has no affine)."""
        return None

    def normalized_variance(self, params: P, x: torch.Tensor) -> torch.Tensor | None:
        """The variance `normalize` divides each of its groups of `x` by (before its eps): the scale
        calibration chooses eps on. None when eps is not calibration's to choose."""
        return None

    def params_from_module(self, module: nn.Module) -> dict[str, Any] | None:
        """This target's plan parameters read back from a module it built (calibrating a
        converted model without its plan); None when `module` is not one of its modules."""
        return None

    def affine_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters of its normalization's per-channel affine (what `--heal-params norm`
        trains): a module's `weight` and `bias`."""
        return [
            p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if isinstance(p, nn.Parameter)
        ]


def hand_over(source: nn.Module, target: nn.Module, names: tuple[str, ...]) -> None:
    """Hand `source`'s same-named parameters / buffers to `target`: the very tensor objects where
    `target` built a slot of the same kind, shape, dtype and device (as torch's
    convert_sync_batchnorm does, so optimizers, parameter groups and EMA copies holding them keep
    working), else their values copied (a parametrized tensor, computed on access, is copied)."""
    for name in names:
        value, slot = getattr(source, name, None), getattr(target, name, None)
        if not isinstance(value, torch.Tensor) or not isinstance(slot, torch.Tensor):
            continue
        if _same_kind(value, slot):
            setattr(target, name, value)  # nn.Module.__setattr__ puts it in the slot's own table
        else:
            with torch.no_grad():
                slot.copy_(value)


def _same_kind(value: torch.Tensor, slot: torch.Tensor) -> bool:
    return (
        isinstance(value, nn.Parameter) == isinstance(slot, nn.Parameter)
        and value.shape == slot.shape
        and value.dtype == slot.dtype
        and value.device == slot.device
    )


def factory(bn: nn.Module) -> dict[str, Any]:
    """`device=` and `dtype=` of the BatchNorm's tensors, to build its replacement in them (a
    float64 model stays exact; a model on the meta device gets a meta skeleton)."""
    reference = next(
        (t for t in [*bn.parameters(recurse=False), *bn.buffers(recurse=False)] if t.is_floating_point()), None
    )
    return {} if reference is None else {"device": reference.device, "dtype": reference.dtype}


def set_attributes(module: nn.Module, **values: Any) -> None:
    """Plain attributes on a module (a channel count, eps: what its forward or its readers use)."""
    for name, value in values.items():
        setattr(module, name, value)


def drop_statistics(module: nn.Module) -> None:
    """Running statistics out of a taken-over module (they leave its state_dict too)."""
    set_attributes(module, track_running_stats=False)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        module.register_buffer(name, None)


def carry_affine(bn: _BatchNorm, new: nn.Module, trainable: bool = True) -> nn.Module:
    """Hand BatchNorm's weight and bias Parameter objects to `new` (built in bn's dtype and on its
    device: see `factory`; `hand_over`), keep their requires_grad (or freeze them), and match
    bn's training flag."""
    hand_over(bn, new, ("weight", "bias"))
    for name in ("weight", "bias"):
        source, slot = getattr(bn, name, None), getattr(new, name, None)
        if isinstance(source, torch.Tensor) and isinstance(slot, torch.Tensor):
            slot.requires_grad_(source.requires_grad and trainable)
    return new.train(bn.training)


def common_params(site: Site) -> dict[str, Any]:
    return {"eps": site.eps, "affine": site.affine}


def require_channels(site: Site) -> int:
    """The site's channel count.

    Raises:
        Refusal: a lazy layer the example inputs never reached has none yet.
    """
    if site.num_features is None:
        raise Refusal(
            f"{where(site)} was not reached by the example inputs and, being lazy, has no channel count yet; "
            f"give example inputs that reach it, or keep it (--keep {site.name})."
        )
    return site.num_features


def where(site: Site) -> str:
    shape = "x".join(str(d) for d in site.input_shape) if site.input_shape else "unknown"
    return f"Layer '{site.name}' ({site.flavour}, input {shape})"
