"""The sites calibration fits: where each one's affine lives, what it normalizes and what it is
fitted to, and how to watch both while a model runs."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from .. import targets
from ..capture.tracer import BATCH_NORM_FUNCTIONS, BatchNormArgs
from ..errors import CalibrationError
from ..passes.rewrite_functional import SITE_META
from ..plan import PlanEntry
from ..sites import SiteKind
from ..targets.base import NormParams, set_attributes
from ..targets.takeover import TakenOver
from ..torchutil import tensor_attribute
from .stats import AffineFit, EpsSums

# the eps a new layer may take, in multiples of the typical variance it divides by: a larger eps
# lets through some of the scale the normalization removes (an image's contrast, where BatchNorm
# kept it), and at 1 still halves the range of scales a group can reach
EPS_CHOICES = (0.25, 1.0, 4.0, 16.0)


class Stop(Exception):
    """Raised from a hook to end a forward pass once what was wanted has been seen."""


@dataclass
class AffineSite:
    """One converted site to calibrate: the converted layer's affine, and the original BatchNorm
    (module sites, fitted to its eval-mode output) or None (functional sites: fitted to the
    output of the original call, traced in eval mode)."""

    entry: PlanEntry
    weight: torch.Tensor
    bias: torch.Tensor
    batchnorm: _BatchNorm | None
    layer: nn.Module | None = None  # the new layer, where calibration may choose its eps
    eps_choices: tuple[float, ...] = ()  # chosen on the first batch's input; [0] is the layer's own
    eps: float | None = None  # the eps the fit chose, once fitted

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def functional(self) -> bool:
        return self.batchnorm is None

    @property
    def params(self) -> NormParams:
        return norm_params(self.entry)

    def normalized(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """z: the new layer's normalization of `x` with `eps`, before its affine."""
        z = targets.get(self.entry.target).normalize(dataclasses.replace(self.params, eps=eps), x)
        if z is None:
            raise CalibrationError(f"Target '{self.entry.target}' of '{self.name}' is not calibrated.")
        return z

    def sums(self, x: torch.Tensor, y: torch.Tensor) -> EpsSums:
        """One batch's sums: z from the new layer's input `x` at each eps it may take, and the target `y`."""
        if not self.eps_choices:
            self.eps_choices = self._eps_choices(x)
        return EpsSums.of({eps: self.normalized(x, eps) for eps in self.eps_choices}, y)

    def _eps_choices(self, x: torch.Tensor) -> tuple[float, ...]:
        """The layer's own eps, and larger ones scaled by the variance it divides by, where the
        layer reads its eps from the attribute calibration sets."""
        variance = targets.get(self.entry.target).normalized_variance(self.params, x)
        own = _own_eps(self.layer) if self.layer is not None else None
        if variance is None or own is None:
            return (self.params.eps,)
        typical = float(variance.detach().float().median())
        return (own, *sorted({k * typical for k in EPS_CHOICES if k * typical > own}))

    def target(self, seen: torch.Tensor) -> torch.Tensor:
        """y: for a module site, the original BatchNorm's eval-mode output on its input `seen`;
        for a functional site, `seen` is already the original call's output."""
        return seen if self.batchnorm is None else original_batchnorm_output(self.batchnorm, seen)

    def set_affine(self, fit: AffineFit) -> None:
        """The fitted affine, and the eps it was fitted with (in the layer and in the plan entry)."""
        self.weight.copy_(fit.scale.to(self.weight.dtype))
        self.bias.copy_(fit.shift.to(self.bias.dtype))
        if fit.eps is not None and self.layer is not None and _own_eps(self.layer) is not None:
            self.eps = fit.eps
            set_eps(self.entry, self.layer, fit.eps)


def set_eps(entry: PlanEntry, layer: nn.Module, eps: float) -> None:
    """The new layer's eps, in the layer and in its plan entry (which plan.json saves)."""
    set_attributes(layer, eps=eps)
    entry.params = dataclasses.replace(norm_params(entry), eps=eps)


def norm_params(entry: PlanEntry) -> NormParams:
    """The entry's parameters, which for every calibrated target carry eps and affine."""
    if not isinstance(entry.params, NormParams):
        raise CalibrationError(f"Target '{entry.target}' of '{entry.name}' is not calibrated.")
    return entry.params


def _own_eps(layer: nn.Module) -> float | None:
    """The `eps` attribute the layer normalizes with: a torch or normswap layer's, not a taken-over
    subclass's, whose forward may pass any eps (None)."""
    eps = getattr(layer, "eps", None)
    return eps if isinstance(eps, float) and not isinstance(layer, TakenOver) else None


def module_site(entry: PlanEntry, converted: nn.Module, original: nn.Module, fit_eps: bool = True) -> AffineSite:
    """The site of a module; with `fit_eps`, calibration may choose its new layer's eps."""
    old, new = original.get_submodule(entry.name), converted.get_submodule(entry.name)
    weight, bias = tensor_attribute(new, "weight"), tensor_attribute(new, "bias")
    if not isinstance(old, _BatchNorm):
        raise CalibrationError(
            f"Layer '{entry.name}' of the original model is a {type(old).__name__}, not a BatchNorm."
        )
    if weight is None or bias is None:
        raise CalibrationError(f"Layer '{entry.name}' has no affine parameters (affine=False) to calibrate.")
    return AffineSite(entry, weight, bias, old, new if fit_eps else None)


def functional_site(entry: PlanEntry, converted: fx.GraphModule, new: list[fx.Node], old: list[fx.Node]) -> AffineSite:
    """A rewritten functional call (its `new` nodes in the converted graph, its `old` ones in a
    trace of the original); weight and bias keep their attribute names through the rewrite."""
    if not new or not old:
        raise CalibrationError(
            f"Functional site '{entry.name}' is not in the converted graph; calibrate the model convert() returned."
        )
    call = BatchNormArgs.of_node(old[0])
    if not all(isinstance(v, fx.Node) and v.op == "get_attr" for v in (call.weight, call.bias)):
        raise CalibrationError(f"Functional site '{entry.name}' has no weight/bias attributes to calibrate.")
    return AffineSite(entry, _attribute(converted, call.weight.target), _attribute(converted, call.bias.target), None)


class CallIndex:
    """Where each site is called in one graph, read in one pass: the call nodes of each module,
    the replacement nodes the rewrite pass tagged, and every node by name."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.modules: dict[str, list[fx.Node]] = defaultdict(list)
        self.tagged: dict[str, list[fx.Node]] = defaultdict(list)
        self.named: dict[str, fx.Node] = {}
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                self.modules[str(node.target)].append(node)
            if SITE_META in node.meta:
                self.tagged[node.meta[SITE_META]].append(node)
            self.named[node.name] = node

    def converted(self, entry: PlanEntry) -> list[fx.Node]:
        """The nodes computing the converted site: its replacement call (functional, tagged by
        the rewrite pass) or each call of its module (a module reused at every time step has several)."""
        return (
            self.tagged.get(entry.name, []) if entry.kind is SiteKind.FUNCTIONAL else self.modules.get(entry.name, [])
        )

    def original(self, entry: PlanEntry) -> list[fx.Node]:
        """The nodes computing the original site in a trace of the original model."""
        if entry.kind is SiteKind.FUNCTIONAL:
            return [self.named[entry.name]] if entry.name in self.named else []
        return self.modules.get(entry.name, [])


def _attribute(root: nn.Module, target: str) -> torch.Tensor:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def original_batchnorm_output(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The original BatchNorm's eval-mode normalization (with affine, without any subclass extras)."""
    mean, var = tensor_attribute(module, "running_mean"), tensor_attribute(module, "running_var")
    weight, bias = tensor_attribute(module, "weight"), tensor_attribute(module, "bias")
    return F.batch_norm(x, mean, var, weight, bias, mean is None, 0.0, module.eps)


class BatchNormInputs(TorchFunctionMode):
    """Collects the input of every batch_norm call made while `inside[0]` is true (a BatchNorm
    subclass may transform x before its call), raising Stop after `calls` of them."""

    def __init__(self, inside: list[bool], seen: list[torch.Tensor], calls: int) -> None:
        super().__init__()
        self.inside, self.seen, self.calls = inside, seen, calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in BATCH_NORM_FUNCTIONS and self.inside[0]:
            self.seen.append(BatchNormArgs.of(func, args, kwargs).input.detach())
            if len(self.seen) >= self.calls:
                raise Stop  # nothing downstream is needed
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def observing(module: nn.Module, seen: list[torch.Tensor], calls: int) -> Iterator[None]:
    """Records what the converted layer `module` normalizes on each call, raising Stop after
    `calls`: its input, or for a subclass whose normalization was taken over, the input of that
    normalization."""

    def observe(x: torch.Tensor) -> None:
        seen.append(x.detach())
        if len(seen) >= calls:
            raise Stop

    if isinstance(module, TakenOver):
        module.normswap_observer = observe
        try:
            yield
        finally:
            module.normswap_observer = None
    else:
        handle = module.register_forward_pre_hook(lambda m, a: observe(a[0]))
        try:
            yield
        finally:
            handle.remove()


def concatenated(seen: list[torch.Tensor], name: str) -> torch.Tensor:
    if not seen:
        raise CalibrationError(f"Layer '{name}' is never called on the calibration inputs.")
    return seen[0] if len(seen) == 1 else torch.cat(seen)  # a module reused at every time step contributes every step


def computes_batch_norm_alone(module: nn.Module) -> bool:
    """The module's output is its eval-mode batch_norm and nothing else: torch's own forward and no
    forward hook that could change the output (a subclass may add an activation)."""
    return type(module).forward is _BatchNorm.forward and not module._forward_hooks
