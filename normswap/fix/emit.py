"""The code that replaces one spot, for every site built there.

Calls keep the arguments that still mean something (the channel count, eps, affine, device,
dtype) as the user wrote them and drop the ones that no longer apply (momentum,
track_running_stats). One line that builds several sites gets literal parameters when they
agree, else an expression of the channel argument. GroupNorm and LayerNorm over features are
plain torch; the channel LayerNorm, frozen BatchNorm and BatchNorm-signature drop-ins come from
`normswap.nn`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import libcst as cst

from .. import targets
from ..plan import PlanEntry
from ..targets.groupnorm import choose_num_groups
from .locate import CALL, VALUE, Spot

BATCHNORM_PARAMETERS = ("num_features", "eps", "momentum", "affine", "track_running_stats", "device", "dtype")
LAZY_BATCHNORM_PARAMETERS = ("eps", "momentum", "affine", "track_running_stats", "device", "dtype")
F_BATCH_NORM = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
TORCH_BATCH_NORM = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")
NORMSWAP_NN = "normswap.nn"


@dataclass(frozen=True)
class Code:
    """The new code for a spot and the modules it needs imported."""

    text: str
    imports: tuple[str, ...] = ()


def replacement(spot: Spot, entries: Sequence[PlanEntry]) -> Code | str:
    """The code replacing `spot` for every entry built there, or why one replacement cannot
    serve them all."""
    chosen = {entry.target for entry in entries}
    if len(chosen) != 1:
        plans = ", ".join(f"{e.name}: {e.target}" for e in entries)
        return f"the layers built here have different plans ({plans}); give them one target (a plan or --keep) or build them on separate lines"
    (target,) = chosen
    if target == "keep":
        return "kept by the plan"
    if spot.kind == CALL:
        return _call(spot, target, entries)
    if spot.kind == VALUE:
        return _value(spot, target, entries)
    return _functional(spot, target, entries)


def _bound(call: cst.Call, names: Sequence[str], spot: Spot) -> dict[str, str] | None:
    """Argument code by parameter name; None when the call passes *args or **kwargs."""
    bound: dict[str, str] = {}
    for index, arg in enumerate(call.args):
        if arg.star:
            return None
        if arg.keyword is not None:
            bound[arg.keyword.value] = spot.file.code(arg.value)
        elif index < len(names):
            bound[names[index]] = spot.file.code(arg.value)
    return bound


def _keywords(arguments: dict[str, str], renames: dict[str, str]) -> str:
    """ ", eps=1e-3, affine=False" for the arguments the user wrote, renamed for the new class."""
    return "".join(f", {renames.get(name, name)}={arguments[name]}" for name in ("eps", "affine", "device", "dtype") if name in arguments)


def _torch_nn(spot: Spot, func: cst.BaseExpression) -> tuple[str, tuple[str, ...]]:
    """How this file reaches torch.nn: `nn.` for `nn.BatchNorm2d`, else `torch.nn.`."""
    if isinstance(func, cst.Attribute):
        return spot.file.code(func.value) + ".", ()
    return "torch.nn.", ("torch",)


def _agreed(entries: Sequence[PlanEntry], key: str) -> object | str:
    """The one value of `key` all entries share (several layers built at one line)."""
    values = {repr(entry.params.get(key)) for entry in entries}
    if len(values) != 1:
        return f"the layers built here differ in {key}; build them on separate lines"
    return entries[0].params.get(key)


def _groups(entries: Sequence[PlanEntry]) -> dict[int, int] | str:
    mapping: dict[int, int] = {}
    for entry in entries:
        channels, groups = int(entry.params["num_channels"]), int(entry.params["num_groups"])
        if mapping.setdefault(channels, groups) != groups:
            return f"layers of {channels} channels built here have different group counts; build them on separate lines"
    return dict(sorted(mapping.items()))


def _simple(code: str) -> bool:
    """An expression that may be written twice (a name, an attribute, a number)."""
    try:
        node = cst.parse_expression(code)
    except cst.ParserSyntaxError:
        return False
    return isinstance(node, (cst.Name, cst.Attribute, cst.Integer))


def _call(spot: Spot, target: str, entries: Sequence[PlanEntry]) -> Code | str:
    call = spot.node
    assert isinstance(call, cst.Call)  # a CALL spot is a call
    lazy = any("Lazy" in name for name in spot.file.batchnorm_classes(call.func))
    arguments = _bound(call, LAZY_BATCHNORM_PARAMETERS if lazy else BATCHNORM_PARAMETERS, spot)
    if arguments is None:
        return f"`{spot.file.code(call)}` passes its arguments through *args / **kwargs"
    if lazy:  # the plan knows the channel count the lazy layer learnt on its first call
        count = _agreed(entries, "num_features" if target == "frozen" else "num_channels")
        if isinstance(count, str):
            return count
        arguments["num_features"] = str(count)
    channels = arguments.get("num_features")
    if channels is None:
        return f"`{spot.file.code(call)}` does not pass the channel count"
    prefix, imports = _torch_nn(spot, call.func)
    if target == "syncbn":
        written = spot.file.code(call)
        return Code(prefix + "SyncBatchNorm" + written[len(spot.file.code(call.func)) :], imports)
    if target == "frozen":
        return Code(f"{NORMSWAP_NN}.FrozenBatchNorm({channels}{_keywords(arguments, {})})", (NORMSWAP_NN,))
    if target == "layernorm":
        if all(e.params.get("layout") == "features" for e in entries):
            return Code(f"{prefix}LayerNorm({channels}{_keywords(arguments, {'affine': 'elementwise_affine'})})", imports)
        return Code(f"{NORMSWAP_NN}.ChannelLayerNorm({channels}{_keywords(arguments, {})})", (NORMSWAP_NN,))
    if target == "groupnorm":
        mapping = _groups(entries)
        if isinstance(mapping, str):
            return mapping
        keywords = _keywords(arguments, {})
        if len(set(mapping.values())) == 1:
            return Code(f"{prefix}GroupNorm({next(iter(mapping.values()))}, {channels}{keywords})", imports)
        if _simple(channels):
            return Code(f"{prefix}GroupNorm({mapping}[{channels}], {channels}{keywords})", imports)
        return Code(f"{NORMSWAP_NN}.GroupNormBN({channels}{keywords}, groups={mapping})", (NORMSWAP_NN,))
    return f"the {target} target has no form in source code"


def _value(spot: Spot, target: str, entries: Sequence[PlanEntry]) -> Code | str:
    if target == "frozen":
        return Code(f"{NORMSWAP_NN}.FrozenBatchNorm", (NORMSWAP_NN,))
    if target == "layernorm":
        return Code(f"{NORMSWAP_NN}.ChannelLayerNorm", (NORMSWAP_NN,))
    if target == "syncbn":
        prefix, imports = _torch_nn(spot, spot.node)  # type: ignore[arg-type]
        return Code(prefix + "SyncBatchNorm", imports)
    if target == "groupnorm":
        mapping = _groups(entries)
        if isinstance(mapping, str):
            return mapping
        if all(choose_num_groups(c, 2)[0] == g for c, g in mapping.items()):  # the drop-in's own rule gives them all
            return Code(f"{NORMSWAP_NN}.GroupNormBN", (NORMSWAP_NN,))
        return Code(f"functools.partial({NORMSWAP_NN}.GroupNormBN, groups={mapping})", ("functools", NORMSWAP_NN))
    return f"the {target} target has no form in source code"


def _functional(spot: Spot, target: str, entries: Sequence[PlanEntry]) -> Code | str:
    """The functional norm `convert` computes for this call (plain torch where it can be)."""
    call = spot.node
    assert isinstance(call, cst.Call)  # a FUNCTIONAL spot is a call
    if len({repr(sorted(e.params.items())) for e in entries}) != 1:
        return "the calls made here have different plans; make them on separate lines"
    params = entries[0].params
    torch_form = "torch.batch_norm" in spot.file.qualified(call.func)
    arguments = _bound(call, TORCH_BATCH_NORM if torch_form else F_BATCH_NORM, spot)
    if arguments is None or "input" not in arguments:
        return f"`{spot.file.code(call)}` passes its arguments through *args / **kwargs"
    imports: tuple[str, ...]
    if isinstance(call.func, cst.Attribute) and not torch_form:
        functional, imports = spot.file.code(call.func.value) + ".", ()  # `F.` for `F.batch_norm`
    else:
        functional, imports = "torch.nn.functional.", ("torch",)
    x, weight, bias = arguments["input"], arguments.get("weight", "None"), arguments.get("bias", "None")
    eps = arguments.get("eps", repr(float(params.get("eps", 1e-5))))
    if target == "groupnorm":
        return Code(f"{functional}group_norm({x}, {int(params['num_groups'])}, {weight}, {bias}, {eps})", imports)
    if target == "layernorm":
        return Code(f"{NORMSWAP_NN}.channel_layer_norm({x}, {weight}, {bias}, {eps}, {int(params['num_channels'])})", (NORMSWAP_NN,))
    if target == "frozen":
        mean, var = arguments.get("running_mean"), arguments.get("running_var")
        if mean is None or var is None or "None" in (mean, var):
            return "the call passes no running statistics to freeze"
        return Code(f"{functional}batch_norm({x}, {mean}, {var}, {weight}, {bias}, False, 0.0, {eps})", imports)
    return f"the {target} target has no form in source code"


def is_safe(target: str) -> bool:
    """A fix that keeps the function (frozen) is safe; the others change it."""
    return targets.get(target).keeps_function
