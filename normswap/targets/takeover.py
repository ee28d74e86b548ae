"""Take over a BatchNorm *subclass* instance: a module of the target's class that keeps the subclass's forward.

timm's `BatchNormAct2d` computes `F.batch_norm` itself, then dropout and an activation; other
subclasses call `super().forward()`. The converted instance belongs to a class built from the
subclass: the subclass's own namespace (its methods rebound, so that `super()` resolves in the new
hierarchy) over the target's *takeover base* (a GroupNorm, a channel LayerNorm, a frozen
BatchNorm...) where torch's BatchNorm class was. So it is no longer a BatchNorm to anyone
(`isinstance` in `convert_sync_batchnorm`, BatchNorm freezing, Opacus) and it is an instance of the
target's torch class where there is one (`nn.GroupNorm`), like timm's own `GroupNormAct`.

Its forward is the subclass's forward, run under a TorchFunctionMode that computes each
`batch_norm` call with the target; `super().forward(x)` reaches the takeover base, which computes
the target directly. Everything else the forward does (asserts, momentum bookkeeping, dropout,
activation) and every submodule and parameter name stay. Instances pickle by reference to the
subclass and the takeover base (`__reduce_ex__`), so `torch.save` of the whole model, `deepcopy` and
multiprocessing spawn rebuild the same class.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..capture.tracer import BATCH_NORM_FUNCTIONS, BatchNormArgs
from ..errors import PlanError
from ..torchutil import Replacement, is_torch_class, module_class


class TakenOver(Replacement):
    """Mixin of every takeover base: the target it computes, and what a converted instance keeps."""

    # set on each takeover base: computes batch_norm calls as `target.function(params, call)`
    target: ClassVar[Any]
    # set on each converted class: the BatchNorm subclass it was built from, and its takeover base
    source: ClassVar[type]
    base: ClassVar[type]
    normswap_params: Any  # its target's parameters
    # calibration sets this to see the input of each normalization
    normswap_observer: Callable[[torch.Tensor], None] | None = None
    # a takeover base that is a torch BatchNorm of one rank checks its own input; the others
    # keep the input check of the torch class the subclass extended
    checks_own_input: ClassVar[bool] = False

    @classmethod
    def class_name(cls, name: str) -> str:
        """The name of a converted class built from a class called `name`: GroupNormAct2d,
        LayerNormAct2d, FrozenBatchNormAct2d."""
        label = str(getattr(cls, "label", cls.__name__))
        return name.replace("BatchNorm", label) if "BatchNorm" in name else f"{label}{name}"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if TakenOver in cls.__bases__:  # a takeover base: its forward is what `super().forward(x)` reaches
            cls.forward = _observing(cls.forward)  # type: ignore[attr-defined]

    def __reduce_ex__(self, protocol: Any) -> Any:
        cls = type(self)
        if not hasattr(cls, "source"):  # a takeover base used directly: an ordinary module
            return super().__reduce_ex__(protocol)
        return (_rebuild, (cls.source, cls.base), self.__dict__)


def _observing(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A takeover base's forward that shows calibration its input: a subclass calling
    `super().forward(x)` normalizes there, not in a batch_norm call the mode below sees (and
    any batch_norm call inside, e.g. a frozen BatchNorm's, is the same normalization)."""

    @functools.wraps(forward)
    def observed(self: TakenOver, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        observer = self.normswap_observer
        if observer is None:
            return forward(self, x, *args, **kwargs)
        observer(x)
        self.normswap_observer = None
        try:
            return forward(self, x, *args, **kwargs)
        finally:
            self.normswap_observer = observer

    return observed


class _TakeOver(TorchFunctionMode):
    """Computes the batch_norm calls made in one module's forward with its target."""

    def __init__(self, module: TakenOver) -> None:
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in BATCH_NORM_FUNCTIONS:
            return func(*args, **(kwargs or {}))
        module = self.module
        call = BatchNormArgs.of(func, args, kwargs)
        if call.running_mean is None and call.running_var is None:
            # a subclass that passes no statistics in training still owns them (frozen uses them)
            call.running_mean, call.running_var = (
                getattr(module, "running_mean", None),
                getattr(module, "running_var", None),
            )
        if module.normswap_observer is not None:
            module.normswap_observer(call.input)
        function, arguments = type(module).target.function(module.normswap_params, call)
        return function(*arguments)


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
        built = _build(source, base)
        built.source, built.base = source, base  # type: ignore[attr-defined]  # TakenOver's class attributes
        _CONVERTED[key] = built
    return _CONVERTED[key]


def _build(cls: type, base: type) -> type:
    """`cls` rebuilt over `base`: each class of its hierarchy above torch's BatchNorm copied, with
    the methods' `super()` cell pointing at the copy; torch's BatchNorm classes replaced by `base`
    (with the input-shape check of the torch class the subclass extended, unless `base` checks
    its own)."""
    if cls.__module__.startswith("torch.nn") and issubclass(cls, _BatchNorm):
        check = None if getattr(base, "checks_own_input", False) else getattr(cls, "_check_input_dim", None)
        return (
            type(base.__name__, (base,), {"_check_input_dim": check, "__module__": base.__module__}) if check else base
        )
    if not issubclass(cls, _BatchNorm):
        return cls  # a mixin: kept as it is
    bases = tuple(_build(b, base) for b in cls.__bases__)
    name = base.class_name(cls.__name__)  # type: ignore[attr-defined]  # a TakenOver base
    cell = types.CellType()
    namespace = {
        key: _rebound(value, cell) for key, value in vars(cls).items() if key not in ("__dict__", "__weakref__")
    }
    if "forward" in namespace:
        namespace["forward"] = _taking_over(namespace["forward"])
    namespace.update(__module__=__name__, __qualname__=name)
    new = type(name, bases, namespace)
    cell.cell_contents = new
    return new


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
