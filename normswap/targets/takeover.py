"""Take over a BatchNorm *subclass* instance: a module of the target's class that keeps the subclass's forward.

timm's `BatchNormAct2d` computes `F.batch_norm` itself, then dropout and an activation; other
subclasses call `super().forward()`. The converted instance belongs to a class built from the
subclass: the subclass's own namespace (its methods rebound, so that `super()` resolves in the new
hierarchy) over the target's *takeover base* (a GroupNorm, a channel LayerNorm, a frozen
BatchNorm...) where torch's BatchNorm class was. So it is no longer a BatchNorm to anyone
(`isinstance` in `convert_sync_batchnorm`, BatchNorm freezing, Opacus) and it is an instance of the
target's torch class where there is one (`nn.GroupNorm`), like timm's own `GroupNormAct`.

Its forward is the subclass's forward, recompiled from its source with each `batch_norm` call made a
call to `normswap_batch_norm`, which computes the target (takeover_source.py): plain Python, so the
module scripts, traces and FX-traces wherever the subclass did. Where the source cannot be read, or
a call might reach batch_norm unseen (a helper of the user's module), the forward runs instead under
a TorchFunctionMode that computes each `batch_norm` call with the target (eager mode only).
`super().forward(x)` reaches the takeover base, which computes the target directly. Everything else the forward does (asserts, momentum bookkeeping, dropout,
activation) and every submodule and parameter name stay. Instances pickle by reference to the
subclass and the takeover base (`__reduce_ex__`), so `torch.save` of the whole model, `deepcopy` and
multiprocessing spawn rebuild the same class.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..capture.tracer import BATCH_NORM_FUNCTIONS, BatchNormArgs
from ..errors import PlanError
from ..torchutil import Replacement, is_torch_class, module_class
from .takeover_source import Unseen, methods_forward_runs, redirected

log = logging.getLogger(__name__)


class TakenOver(Replacement):
    """Mixin of every takeover base: the target it computes, and what a converted instance keeps.

    `forward(x)` (what a subclass's `super().forward(x)` reaches) and `normswap_batch_norm` (what
    its `F.batch_norm(...)` calls become) compute the target through `normswap_normalize`, which
    each built-in base defines in a form TorchScript compiles; this default asks the target.
    """

    if TYPE_CHECKING:  # for type checkers only: TorchScript cannot read these annotations
        # set on each takeover base: computes batch_norm calls as `target.function(params, call)`
        target: ClassVar[Any]
        # set on each converted class: the BatchNorm subclass it was built from, and its takeover base
        source: ClassVar[type]
        base: ClassVar[type]
        normswap_params: Any  # its target's parameters
        normswap_observer: Callable[[torch.Tensor], None] | None
    normswap_observer = None  # calibration sets this to see the input of each normalization
    # a takeover base that is a torch BatchNorm of one rank checks its own input; the others
    # keep the input check of the torch class the subclass extended
    checks_own_input = False

    @classmethod
    def class_name(cls, name: str) -> str:
        """The name of a converted class built from a class called `name`: GroupNormAct2d,
        LayerNormAct2d, FrozenBatchNormAct2d."""
        label = str(getattr(cls, "label", cls.__name__))
        return name.replace("BatchNorm", label) if "BatchNorm" in name else f"{label}{name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normswap_batch_norm(x, None, None, self.weight, self.bias)  # type: ignore[attr-defined]  # a module's

    def normswap_batch_norm(
        self,
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        """One `F.batch_norm` call of the subclass's forward, computed with the target."""
        if not torch.jit.is_scripting():
            observer = self.normswap_observer
            if observer is not None:
                observer(input)
        return self.normswap_normalize(input, running_mean, running_var, weight, bias, training, momentum, eps)

    def normswap_torch_batch_norm(
        self,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        cudnn_enabled: bool,
    ) -> torch.Tensor:
        """One `torch.batch_norm` call (its argument order), computed with the target."""
        return self.normswap_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)

    def normswap_normalize(
        self,
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        call = BatchNormArgs(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if call.running_mean is None and call.running_var is None:
            # a subclass that passes no statistics in training still owns them (frozen uses them)
            call.running_mean = getattr(self, "running_mean", None)
            call.running_var = getattr(self, "running_var", None)
        function, arguments = type(self).target.function(self.normswap_params, call)
        return function(*arguments)

    def __reduce_ex__(self, protocol: Any) -> Any:
        cls = type(self)
        if not hasattr(cls, "source"):  # a takeover base used directly: an ordinary module
            return super().__reduce_ex__(protocol)
        return (_rebuild, (cls.source, cls.base), self.__dict__)


class _TakeOver(TorchFunctionMode):
    """Computes the batch_norm calls made in one module's forward with its target (the fallback
    for a forward whose calls `takeover_source` cannot redirect)."""

    def __init__(self, module: TakenOver) -> None:
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in BATCH_NORM_FUNCTIONS:
            return func(*args, **(kwargs or {}))
        call = BatchNormArgs.of(func, args, kwargs)
        return self.module.normswap_batch_norm(
            call.input,
            call.running_mean,
            call.running_var,
            call.weight,
            call.bias,
            call.training,
            call.momentum,
            call.eps,
        )


def _taking_over(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The subclass's forward, with its batch_norm calls computed by the target."""

    @functools.wraps(forward)
    def wrapped(self: TakenOver, *args: Any, **kwargs: Any) -> Any:
        with _TakeOver(self):
            return forward(self, *args, **kwargs)

    return wrapped


def is_subclass_instance(module: nn.Module) -> bool:
    """A BatchNorm whose class is not torch's own (its forward may add behaviour to keep)."""
    return isinstance(module, _BatchNorm) and not is_torch_class(module)


_CONVERTED: dict[tuple[type, type], type] = {}


def converted_class(source: type, base: type) -> type:
    """The class a `source` BatchNorm subclass instance becomes over the takeover `base` (cached)."""
    key = (source, base)
    if key not in _CONVERTED:
        unseen: list[str] = []
        built = _build(source, base, methods_forward_runs(source), unseen)
        if unseen:  # a batch_norm call may hide where the source rewrite cannot see: catch it at run time
            log.debug("%s runs under a TorchFunctionMode: %s", built.__qualname__, "; ".join(unseen))
            built.forward = _taking_over(built.forward)  # type: ignore[attr-defined]
            built.__prepare_scriptable__ = _not_scriptable(source, unseen[0])  # type: ignore[attr-defined]
        built.source, built.base = source, base  # type: ignore[attr-defined]  # TakenOver's class attributes
        _CONVERTED[key] = built
    return _CONVERTED[key]


def _not_scriptable(source: type, reason: str) -> Callable[[nn.Module], nn.Module]:
    """What torch.jit.script calls first on a converted module whose forward runs under the
    TorchFunctionMode (TorchScript cannot compile that): one sentence instead of its error."""

    def refuse(module: nn.Module) -> nn.Module:
        raise PlanError(
            f"{type(module).__name__} (converted from {source.__qualname__}) cannot be scripted: normswap computes its "
            f"batch_norm calls with a TorchFunctionMode, because {reason}; trace it (torch.jit.trace) instead, or have "
            "its forward call F.batch_norm directly."
        )

    return refuse


def _build(cls: type, base: type, forward_runs: set[str], unseen: list[str]) -> type:
    """`cls` rebuilt over `base`: each class of its hierarchy above torch's BatchNorm copied, with
    the methods' batch_norm calls redirected (why a method that forward runs could not be goes to
    `unseen`) and their
    `super()` cell pointing at the copy; torch's BatchNorm classes replaced by `base` (with the
    input-shape check of the torch class the subclass extended, unless `base` checks its own)."""
    if cls.__module__.startswith("torch.nn") and issubclass(cls, _BatchNorm):
        check = None if getattr(base, "checks_own_input", False) else getattr(cls, "_check_input_dim", None)
        return (
            type(base.__name__, (base,), {"_check_input_dim": check, "__module__": base.__module__}) if check else base
        )
    if not issubclass(cls, _BatchNorm):
        return cls  # a mixin: kept as it is
    bases = tuple(_build(b, base, forward_runs, unseen) for b in cls.__bases__)
    name = base.class_name(cls.__name__)  # type: ignore[attr-defined]  # a TakenOver base
    cell = types.CellType()
    namespace = {
        key: _rebound(_redirected(value, unseen if key in forward_runs else []), cell)
        for key, value in vars(cls).items()
        if key not in ("__dict__", "__weakref__")
    }
    namespace.update(__module__=__name__, __qualname__=name)
    new = type(name, bases, namespace)
    cell.cell_contents = new
    return new


def _redirected(value: Any, unseen: list[str]) -> Any:
    """A function of the class body with its batch_norm calls redirected (as it is, noted in
    `unseen`, when that cannot be done)."""
    function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    if isinstance(value, property):
        getter, setter, deleter = (
            _redirected(f, unseen) if f is not None else None for f in (value.fget, value.fset, value.fdel)
        )
        return property(getter, setter, deleter, value.__doc__)
    if not isinstance(function, types.FunctionType):
        return value
    try:
        new = redirected(function)
    except Unseen as reason:
        unseen.append(str(reason))
        return value
    return type(value)(new) if isinstance(value, (staticmethod, classmethod)) else new


def _rebound(value: Any, cell: types.CellType) -> Any:
    """A function of the class body with its `__class__` cell (what zero-argument `super()`
    reads) replaced by `cell`; properties, class and static methods rebuilt around it."""
    if isinstance(value, types.FunctionType):
        if "__class__" not in value.__code__.co_freevars:
            return value
        closure = tuple(
            cell if name == "__class__" else old
            for name, old in zip(value.__code__.co_freevars, value.__closure__ or (), strict=True)
        )
        new = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, closure)
        new.__kwdefaults__ = value.__kwdefaults__
        new.__dict__.update(value.__dict__)
        new.__qualname__, new.__doc__, new.__annotations__ = value.__qualname__, value.__doc__, value.__annotations__
        return new
    if isinstance(value, (staticmethod, classmethod)):
        return type(value)(_rebound(value.__func__, cell))
    if isinstance(value, property):
        getter, setter, deleter = (
            _rebound(f, cell) if f is not None else None for f in (value.fget, value.fset, value.fdel)
        )
        return property(getter, setter, deleter, value.__doc__)
    return value


def _rebuild(source: type, base: type) -> TakenOver:
    """An empty instance of the converted class (unpickling fills its state)."""
    cls = converted_class(source, base)
    instance: TakenOver = cls.__new__(cls)  # type: ignore[call-overload]  # a module class: object.__new__
    return instance


def take_over(bn: _BatchNorm, target: Any, params: Mapping[str, Any], name: str) -> nn.Module:
    """A module of the converted class holding `bn`'s state (parameters, buffers, submodules,
    hooks, attributes), adjusted by the target; `bn` itself is left as it was.

    Raises:
        PlanError: the subclass holds BatchNorm modules of its own, whose calls cannot be told apart.
    """
    inner = [child for child, m in bn.named_modules() if m is not bn and isinstance(m, _BatchNorm)]
    if inner:
        raise PlanError(
            f"BatchNorm subclass '{name}' ({type(bn).__name__}) holds BatchNorm module(s) {', '.join(inner)}; "
            "normswap cannot tell their batch_norm calls apart, so keep it or replace the class in your code."
        )
    cls = converted_class(module_class(bn), target.takeover_base(params))
    new: Any = cls.__new__(cls)  # type: ignore[call-overload]  # a module class: object.__new__
    state = dict(bn.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = dict(
            state[key]
        )  # its own tables; the hook tables stay shared, so users' handles still remove them
    chains = state["_modules"].pop("parametrizations", None)
    for tensor_name in chains or ():  # plain tensors here; the parametrizations move over afterwards (replace.py)
        value = getattr(bn, tensor_name).detach().clone()
        state["_parameters"][tensor_name] = nn.Parameter(
            value, requires_grad=chains[tensor_name].original.requires_grad
        )
    new.__dict__.update(state)
    new.normswap_params = params
    target.prepare_takeover(new, params)
    return new
