"""groupnorm: GroupNorm(G, C) per sample over groups of C/G channels and all positions, with
BatchNorm's per-channel affine carried over; G chosen per layer (see `choose_num_groups`)."""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..capture.tracer import BatchNormArgs
from ..errors import PlanError
from ..sites import Site
from ..torchutil import Replacement
from .base import (
    DEFAULT_CHANNELS_PER_GROUP,
    DEFAULT_MAX_GROUPS,
    NormParams,
    ParamKind,
    PlanOptions,
    Refusal,
    SourceCall,
    SourceCode,
    Target,
    carry_affine,
    common_params,
    drop_statistics,
    factory,
    param,
    require_channels,
    set_attributes,
    where,
)
from .takeover import TakenOver

# How group_norm exports: "layernorm-view" (fastest in onnxruntime, the default) or "native"
# (the exporter's own form; at opset >= 21 that is the GroupNormalization op, opt-in).
GROUP_NORM_EXPORT_FORM: contextvars.ContextVar[str] = contextvars.ContextVar(
    "normswap_group_norm_export_form", default="layernorm-view"
)


def group_norm(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """F.group_norm, exported to ONNX as LayerNormalization over a (N, G, C/G * positions) view
    followed by the per-channel affine: the fastest correct form in onnxruntime among those
    measured in benchmarks/bench_formulations.py (the exporter's own is Reshape ->
    InstanceNormalization -> Reshape -> Mul -> Add). Eager PyTorch keeps the fused kernel."""
    # TorchScript compiles the fused kernel only: it skips a branch on is_scripting() alone, not an `and`
    if not torch.jit.is_scripting():  # noqa: SIM102
        if torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing() and x.dim() >= 2:
            return _exported_group_norm(x, num_groups, weight, bias, eps)
    return F.group_norm(x, num_groups, weight, bias, eps)  # eager, torch.compile, FX: the fused kernel


def _exported_group_norm(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    native = GROUP_NORM_EXPORT_FORM.get() == "native"
    static = all(isinstance(d, int) for d in x.shape[1:])  # a dynamic C/H/W axis keeps the native form
    if native or not static:
        return F.group_norm(x, num_groups, weight, bias, eps)
    per_group = math.prod(x.shape[1:]) // num_groups
    y = F.layer_norm(x.reshape(x.shape[0], num_groups, per_group), (per_group,), None, None, eps).reshape(x.shape)
    if weight is None or bias is None:
        return y
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return y * weight.reshape(shape) + bias.reshape(shape)


class GroupNorm(Replacement, nn.GroupNorm):
    """nn.GroupNorm whose ONNX export uses the faster formulation of `group_norm` (same function).

    Converted models hold torch's own `nn.GroupNorm` (what Opacus, mmcv and timm dispatch on); the
    export swaps this class in for the duration of the export (see `GroupNormTarget.export_context`).
    It answers `num_features`, which code around a BatchNorm reads (e.g. a wrapper's repr).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.num_features = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormTakeover(TakenOver, nn.GroupNorm):
    """Where torch's BatchNorm was in a taken-over subclass: a GroupNorm (timm's `GroupNormAct` shape)."""

    label = "GroupNorm"

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
        return group_norm(input, self.num_groups, weight, bias, self.eps)


@contextlib.contextmanager
def exporting(model: nn.Module, opset: int) -> Iterator[None]:
    """During an ONNX export: torch's own `nn.GroupNorm` modules export in the faster form (their
    class is swapped for this module's `GroupNorm` and back), or in the native form at opset >= 21."""
    token = GROUP_NORM_EXPORT_FORM.set("native" if opset >= 21 else "layernorm-view")
    swapped = [m for m in model.modules() if type(m) is nn.GroupNorm]
    try:
        for module in swapped:
            module.__class__ = GroupNorm
        yield
    finally:
        for module in swapped:
            module.__class__ = nn.GroupNorm
        GROUP_NORM_EXPORT_FORM.reset(token)


def choose_num_groups(
    num_channels: int,
    values_per_channel: int,
    max_groups: int = DEFAULT_MAX_GROUPS,
    channels_per_group: int = DEFAULT_CHANNELS_PER_GROUP,
) -> tuple[int, str]:
    """The largest divisor G of C with G <= max_groups and C/G >= channels_per_group (one group
    when C is narrower than that), whose groups hold more than one value (a group of one value
    always normalizes to zero).

    More channels per group keep more of a trained model's function: one channel per group is
    InstanceNorm, which erases each sample's per-channel intensity (measured in the README).

    Returns:
        (G, the rule that chose it, for the plan reason).
    """
    skipped_degenerate = False
    for groups in range(min(max_groups, num_channels), 0, -1):
        per_group = num_channels // groups
        if num_channels % groups or (groups > 1 and per_group < channels_per_group):
            continue
        if per_group * values_per_channel < 2:
            skipped_degenerate = True
            continue
        if per_group < channels_per_group:  # groups == 1
            why = f"GroupNorm(1, {num_channels}): one group, as {num_channels} channel(s) are fewer than {channels_per_group} per group"
        else:
            why = (
                f"GroupNorm({groups}, {num_channels}): {per_group} channel(s) per group, the largest divisor of {num_channels} "
                f"with at most {max_groups} groups and at least {channels_per_group} channel(s) per group"
            )
        if skipped_degenerate:
            why += " that leaves more than one value per group"
        if groups == num_channels and groups > 1:
            why += " (one channel per group is InstanceNorm, as --channels-per-group 1 asked)"
        return groups, why
    raise PlanError(
        f"A GroupNorm over {num_channels} channel(s) of {values_per_channel} value(s) has no non-degenerate grouping."
    )


class GroupNormBN(GroupNorm):
    """GroupNorm as a drop-in for BatchNorm: BatchNorm's constructor arguments (`momentum` and
    `track_running_stats` mean nothing here), the group count chosen from the channels by
    normswap's rule (`choose_num_groups`), so `norm_layer=GroupNormBN` works wherever
    `norm_layer=nn.BatchNorm2d` did.

    Args:
        groups: the group count, or a mapping from channel count to group count (what earlier
            versions of `normswap lint --fix` wrote; a width it does not list gets the rule);
            None: the rule, with `max_groups` and `channels_per_group`.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = None,
        affine: bool = True,
        track_running_stats: bool | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        groups: int | Mapping[int, int] | None = None,
        max_groups: int = DEFAULT_MAX_GROUPS,
        channels_per_group: int = DEFAULT_CHANNELS_PER_GROUP,
    ) -> None:
        if isinstance(groups, Mapping):
            groups = groups.get(num_features)  # another model built from the same line: the rule
        if groups is None:
            # two values per channel at least: whatever the map size, C/G channels per group
            groups, _ = choose_num_groups(num_features, 2, max_groups, channels_per_group)
        super().__init__(int(groups), num_features, eps=eps, affine=affine, device=device, dtype=dtype)


@dataclass(frozen=True, kw_only=True)
class GroupNormParams(NormParams):
    num_groups: int = param(ParamKind.INT, positive=True)
    num_channels: int = param(ParamKind.INT, positive=True)


class GroupNormTarget(Target[GroupNormParams]):
    name = "groupnorm"
    summary = "GroupNorm(G, C): per sample over groups of channels (convolutional feature maps)"
    calibrated = True
    auto_fallback = "layernorm"  # a map GroupNorm would zero may still have channels to normalize
    params_type = GroupNormParams

    def plan(self, site: Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        channels = require_channels(site)
        try:
            groups, why = choose_num_groups(
                channels, site.values_per_channel, options.max_groups, options.channels_per_group
            )
        except PlanError:
            raise Refusal(
                f"{where(site)} normalizes a single value per sample, which GroupNorm would turn into zeros; use --to frozen or keep it."
            ) from None
        return {"num_groups": groups, "num_channels": channels, **common_params(site)}, why

    def check(self, site_name: str, params: Mapping[str, Any], site: Site | None = None) -> None:
        super().check(site_name, params, site)
        if int(params["num_channels"]) % int(params["num_groups"]):
            raise PlanError(
                f"Plan entry '{site_name}' (groupnorm): num_groups {params['num_groups']} does not divide num_channels {params['num_channels']}."
            )

    def module(self, bn: _BatchNorm, params: GroupNormParams) -> nn.Module:
        new = nn.GroupNorm(params.num_groups, params.num_channels, eps=params.eps, affine=params.affine, **factory(bn))
        set_attributes(new, num_features=params.num_channels)  # what code around a BatchNorm reads
        return carry_affine(bn, new)

    def takeover_base(self, params: GroupNormParams) -> type:
        return GroupNormTakeover

    def prepare_takeover(self, module: nn.Module, params: GroupNormParams) -> None:
        drop_statistics(module)
        set_attributes(
            module, num_groups=params.num_groups, num_channels=params.num_channels, eps=params.eps, affine=params.affine
        )

    def export_context(self, model: nn.Module, opset: int) -> contextlib.AbstractContextManager[None]:
        return exporting(model, opset)

    def function(self, params: GroupNormParams, call: BatchNormArgs) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return group_norm, (call.input, params.num_groups, call.weight, call.bias, params.eps)

    def normalize(self, params: GroupNormParams, x: torch.Tensor) -> torch.Tensor | None:
        return F.group_norm(x, params.num_groups, None, None, params.eps)

    def normalized_variance(self, params: GroupNormParams, x: torch.Tensor) -> torch.Tensor | None:
        return x.reshape(x.shape[0], params.num_groups, -1).var(-1, unbiased=False)

    def params_from_module(self, module: nn.Module) -> dict[str, Any] | None:
        if not isinstance(module, nn.GroupNorm):
            return None
        return {
            "num_groups": module.num_groups,
            "num_channels": module.num_channels,
            "eps": module.eps,
            "affine": module.affine,
        }

    def source_call(self, call: SourceCall, params: Sequence[GroupNormParams]) -> SourceCode | str:
        """`nn.GroupNorm(G, C, eps=...)` for a literal width; for a width computed in the code,
        `_group_norm(C, ...)`, a plain-torch helper the fix defines in the file, which applies
        the group-count rule at whatever width the code builds."""
        mapping = _group_counts(params)
        if isinstance(mapping, str):
            return mapping
        channels, keywords = call.arguments["num_features"], call.keywords()
        if _is_constant(channels) and len(mapping) == 1:  # the code builds one width only
            return SourceCode(
                f"{call.namespace}GroupNorm({next(iter(mapping.values()))}, {channels}{keywords})", call.imports
            )
        rule = group_rule(mapping, call.options)
        if rule is None:
            return _no_rule(mapping, f"`{channels}`")
        return SourceCode(
            f"{GROUP_NORM_HELPER}({channels}{keywords}{_rule_keywords(rule)})",
            ("torch",),
            ((GROUP_NORM_HELPER, HELPER_SOURCE),),
        )

    def source_class(self, call: SourceCall, params: Sequence[GroupNormParams]) -> SourceCode | str:
        """The same helper, which takes BatchNorm's constructor arguments, as the class value."""
        mapping = _group_counts(params)
        if isinstance(mapping, str):
            return mapping
        rule = group_rule(mapping, call.options)
        if rule is None:
            return _no_rule(mapping, "this norm class")
        keywords = _rule_keywords(rule)
        helper = ((GROUP_NORM_HELPER, HELPER_SOURCE),)
        if keywords:
            return SourceCode(f"functools.partial({GROUP_NORM_HELPER}{keywords})", ("functools", "torch"), helper)
        return SourceCode(GROUP_NORM_HELPER, ("torch",), helper)

    def source_function(self, call: SourceCall, params: GroupNormParams) -> SourceCode | str:
        arguments = call.arguments
        weight, bias = arguments.get("weight", "None"), arguments.get("bias", "None")
        eps = arguments.get("eps", repr(float(params["eps"])))
        return SourceCode(
            f"{call.namespace}group_norm({arguments['input']}, {int(params['num_groups'])}, {weight}, {bias}, {eps})",
            call.imports,
        )


# The function `lint --fix` defines in a file whose BatchNorm is built at computed widths: plain
# torch (the file needs no normswap), BatchNorm's constructor arguments (it also replaces a norm
# class passed as a value), and `choose_num_groups`' rule at any width (tests check they agree).
GROUP_NORM_HELPER = "_group_norm"
HELPER_SOURCE = f'''def {GROUP_NORM_HELPER}(num_features, eps=1e-5, momentum=None, affine=True, track_running_stats=None,
                device=None, dtype=None, *, max_groups={DEFAULT_MAX_GROUPS}, channels_per_group={DEFAULT_CHANNELS_PER_GROUP}):
    """torch.nn.GroupNorm taking BatchNorm's arguments (written by `normswap lint --fix`; momentum
    and track_running_stats mean nothing to it). The group count is the one `normswap convert`
    chooses: the largest divisor of num_features up to max_groups that leaves at least
    channels_per_group channels per group, else one group."""
    groups = [g for g in range(1, max_groups + 1)
              if num_features % g == 0 and num_features // g >= channels_per_group]
    return torch.nn.GroupNorm(max(groups, default=1), num_features, eps=eps, affine=affine,
                              device=device, dtype=dtype)
'''


def group_rule(mapping: Mapping[int, int], preferred: PlanOptions | None = None) -> PlanOptions | None:
    """Options under which `choose_num_groups`' rule gives every width in `mapping` its group count
    (`preferred` first, then the defaults, then those the counts themselves suggest); None when
    no such rule exists (a plan edited by hand, say)."""
    candidates = [preferred] if preferred is not None else []
    candidates.append(PlanOptions())
    suggested_groups = sorted({DEFAULT_MAX_GROUPS, *mapping.values()}, reverse=True)
    suggested_widths = sorted({DEFAULT_CHANNELS_PER_GROUP, *(c // g for c, g in mapping.items())}, reverse=True)
    candidates += [PlanOptions(g, k) for g in suggested_groups for k in suggested_widths]
    for options in candidates:
        # two values per channel: no grouping is degenerate, as at any map size the code may build
        if all(
            choose_num_groups(c, 2, options.max_groups, options.channels_per_group)[0] == g for c, g in mapping.items()
        ):
            return options
    return None


def _rule_keywords(options: PlanOptions) -> str:
    """', max_groups=8': the helper's keywords that differ from its defaults."""
    defaults = PlanOptions()
    return "".join(
        f", {name}={getattr(options, name)}"
        for name in ("max_groups", "channels_per_group")
        if getattr(options, name) != getattr(defaults, name)
    )


def _no_rule(mapping: Mapping[int, int], what: str) -> str:
    return (
        f"the plan's group counts for {what} ({', '.join(f'{c} channels: {g}' for c, g in mapping.items())}) follow no rule of the form "
        "'the largest divisor up to G groups with at least K channels per group', so no code gives other widths theirs; "
        "plan with --groups / --channels-per-group instead of editing group counts"
    )


def _group_counts(params: Sequence[Mapping[str, Any]]) -> dict[int, int] | str:
    """Channel count -> group count over the layers built at one place in the source."""
    mapping: dict[int, int] = {}
    for entry in params:
        channels, groups = int(entry["num_channels"]), int(entry["num_groups"])
        if mapping.setdefault(channels, groups) != groups:
            return f"layers of {channels} channels built here have different group counts; build them on separate lines"
    return dict(sorted(mapping.items()))


def _is_constant(code: str) -> bool:
    """A width written as a number or arithmetic of numbers: the code builds that width only."""
    return re.fullmatch(r"[\d\s+\-*/%()]+", code) is not None and any(c.isdigit() for c in code)


TARGET = GroupNormTarget()
GroupNormTakeover.target = TARGET
