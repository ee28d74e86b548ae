"""The code that replaces one spot, for every site built there.

This module reads the spot (which arguments the user wrote, how the file reaches torch.nn) and
asks the target for its source form (`Target.source_call` / `source_class` /
`source_function` in normswap/targets/): calls keep the arguments that still mean something (the
channel count, eps, affine, device, dtype) as written and drop the rest (momentum,
track_running_stats).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import libcst as cst

from .. import targets
from ..capture.tracer import F_BATCH_NORM_ARGS, TORCH_BATCH_NORM_ARGS
from ..plan import PlanEntry
from ..targets.base import PlanOptions, SourceCall, SourceCode
from .locate import CALL, SYNC_CONVERSION, VALUE, Spot

BATCHNORM_PARAMETERS = ("num_features", "eps", "momentum", "affine", "track_running_stats", "device", "dtype")
LAZY_BATCHNORM_PARAMETERS = ("eps", "momentum", "affine", "track_running_stats", "device", "dtype")
# SyncBatchNorm takes a process group where the others take device
SYNC_BATCHNORM_PARAMETERS = (*BATCHNORM_PARAMETERS[:5], "process_group", "device", "dtype")


def replacement(spot: Spot, entries: Sequence[PlanEntry], options: PlanOptions | None = None) -> SourceCode | str:
    """The code replacing `spot` for every entry built there (planned with `options`, when
    known), or why one replacement cannot serve them all."""
    chosen = {entry.target for entry in entries}
    if len(chosen) != 1:
        plans = ", ".join(f"{e.name}: {e.target}" for e in entries)
        return f"the layers built here have different plans ({plans}); give them one target (a plan or --keep) or build them on separate lines"
    target = targets.get(next(iter(chosen)))
    params = [entry.params for entry in entries]
    if spot.kind == VALUE:
        namespace, imports = _torch_nn(spot, spot.node)
        return target.source_class(SourceCall({}, namespace, imports, options=options), params)
    call = spot.node
    assert isinstance(call, cst.Call)  # CALL and FUNCTIONAL spots are calls
    if spot.kind == SYNC_CONVERSION:
        arguments = _bound(call, ("module", "process_group"), spot)
        if arguments is None or "module" not in arguments:
            return f"`{spot.file.code(call)}` passes its arguments through *args / **kwargs"
        written = SourceCall(arguments, "", written=spot.file.code(call), callee=spot.file.code(call.func))
        return target.source_sync_conversion(written, params)
    if spot.kind == CALL:
        found = _constructor(spot, call, params, target.name)
        return (
            found if isinstance(found, str) else target.source_call(dataclasses.replace(found, options=options), params)
        )
    if len({repr(sorted(p.items())) for p in params}) != 1:
        return "the calls made here have different plans; make them on separate lines"
    found = _functional(spot, call)
    return found if isinstance(found, str) else target.source_function(found, params[0])


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


def _torch_nn(spot: Spot, func: cst.CSTNode) -> tuple[str, tuple[str, ...]]:
    """How this file reaches torch.nn: `nn.` for `nn.BatchNorm2d`, else `torch.nn.` (also for
    `torch.nn.modules.batchnorm.BatchNorm2d`, whose module has no GroupNorm)."""
    if isinstance(func, cst.Attribute) and spot.file.qualified(func.value) == {"torch.nn"}:
        return spot.file.code(func.value) + ".", ()
    return "torch.nn.", ("torch",)


def _constructor(spot: Spot, call: cst.Call, params: Sequence[Mapping[str, Any]], target: str) -> SourceCall | str:
    classes = spot.file.batchnorm_classes(call.func)
    lazy = any("Lazy" in name for name in classes)
    sync = any(name.endswith("SyncBatchNorm") for name in classes)
    names = LAZY_BATCHNORM_PARAMETERS if lazy else SYNC_BATCHNORM_PARAMETERS if sync else BATCHNORM_PARAMETERS
    arguments = _bound(call, names, spot)
    if arguments is None:
        return f"`{spot.file.code(call)}` passes its arguments through *args / **kwargs"
    if lazy:  # the plan knows the channel count the lazy layer learnt on its first call
        counts = {int(p.get("num_channels", p.get("num_features", 0))) for p in params}
        if len(counts) != 1:
            return "the lazy layers built here learnt different channel counts; build them on separate lines"
        arguments["num_features"] = str(counts.pop())
    if "num_features" not in arguments:
        return f"`{spot.file.code(call)}` does not pass the channel count"
    namespace, imports = _torch_nn(spot, call.func)
    return SourceCall(arguments, namespace, imports, spot.file.code(call), spot.file.code(call.func))


def _functional(spot: Spot, call: cst.Call) -> SourceCall | str:
    torch_form = "torch.batch_norm" in spot.file.qualified(call.func)
    arguments = _bound(call, TORCH_BATCH_NORM_ARGS if torch_form else F_BATCH_NORM_ARGS, spot)
    if arguments is None or "input" not in arguments:
        return f"`{spot.file.code(call)}` passes its arguments through *args / **kwargs"
    if isinstance(call.func, cst.Attribute) and not torch_form:
        return SourceCall(arguments, spot.file.code(call.func.value) + ".")  # `F.` for `F.batch_norm`
    return SourceCall(arguments, "torch.nn.functional.", ("torch",))


def is_safe(target: str) -> bool:
    """A fix that keeps the function (frozen) is safe; the others change it."""
    return targets.get(target).keeps_function
