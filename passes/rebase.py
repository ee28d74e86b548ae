"""Take over the normalization of a BatchNorm *subclass* instance, keeping its class and forward.

The instance is rebased onto `(TakenOver, Cls, Plain<Base>)`, where Base is Cls's torch BatchNorm
class and Plain<Base> gives it `_BatchNorm.forward` (so SyncBatchNorm's distributed path is not
taken). Its forward runs `Cls.forward` under a TorchFunctionMode that computes every batch_norm
call made inside it with the plan's target instead: whether Cls.forward calls F.batch_norm itself
(timm's BatchNormAct2d) or calls super().forward(). Everything else the forward does (asserts,
momentum bookkeeping, dropout, activation), the submodules, parameter names and
`isinstance(m, nn.BatchNorm2d)` stay as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from normswap import targets
from normswap.capture.tracer import BATCH_NORM_FUNCTIONS, BatchNormArgs
from normswap.errors import PlanError
from normswap.plan import PlanEntry
from normswap.torchutil import Replacement


class _TakeOver(TorchFunctionMode):
    """Computes the batch_norm calls of one module's forward with its planned target."""

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
            call.running_mean, call.running_var = module.running_mean, module.running_var
        if module.normswap_observer is not None:
            module.normswap_observer(call.input)
        function, arguments = targets.get(module.normswap_target).function(module.normswap_params, call)
        return function(*arguments)


class TakenOver(Replacement):
    """Mixin placed first in a rebased BatchNorm subclass (see the module docstring)."""

    normswap_target: str
    normswap_params: dict[str, Any]
    # calibration sets this to see the input of each normalization
    normswap_observer: Callable[[torch.Tensor], None] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _TakeOver(self):
            return super().forward(*args, **kwargs)  # type: ignore[misc]  # the subclass's own forward, next in the MRO


def torch_base(cls: type) -> type:
    """The torch.nn BatchNorm class a subclass derives from."""
    return next(k for k in cls.__mro__ if issubclass(k, _BatchNorm) and k.__module__.startswith("torch.nn"))


_REBASED: dict[type, type] = {}


def taken_over_class(cls: type) -> type:
    """`cls` rebased as described in the module docstring (one class per subclass, cached)."""
    if cls not in _REBASED:
        base = torch_base(cls)
        plain = type(base.__name__, (base,), {"forward": _BatchNorm.forward, "__module__": base.__module__})
        _REBASED[cls] = type(cls.__name__, (TakenOver, cls, plain), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _REBASED[cls]


def is_subclass_instance(module: nn.Module) -> bool:
    """A BatchNorm whose class is not torch's own (its forward may add behaviour to keep)."""
    return isinstance(module, _BatchNorm) and not type(module).__module__.startswith("torch.nn")


def take_over(bn: _BatchNorm, entry: PlanEntry) -> _BatchNorm:
    """Rebase the subclass instance `bn` so that its normalization computes `entry.target`."""
    inner = [name for name, m in bn.named_modules() if m is not bn and isinstance(m, _BatchNorm)]
    if inner:
        raise PlanError(
            f"BatchNorm subclass '{entry.name}' ({type(bn).__name__}) holds BatchNorm module(s) {', '.join(inner)}; "
            "normswap cannot tell their batch_norm calls apart, so keep it or replace the class in your code."
        )
    target = targets.get(entry.target)
    target.prepare_subclass(bn, entry.params)
    bn.__class__ = taken_over_class(type(bn))
    taken = cast(TakenOver, bn)
    taken.normswap_target = entry.target
    taken.normswap_params = dict(entry.params)
    return bn
