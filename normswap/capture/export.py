"""Capture strategy 2: torch.export (non-strict); its graph carries shapes and nn_module_stack."""

from __future__ import annotations

import torch
from torch import fx, nn

from ..source import location_from_stack_trace
from ..torchutil import quiet_torch
from .calls import BatchNormCall, Capture, shape_of
from .fx import owner_from_stack
from .order import graph_order
from .tracer import is_batchnorm_like


def capture_export(model: nn.Module, inputs: tuple) -> Capture:
    model.train()
    with quiet_torch():
        program = torch.export.export(model, inputs, strict=False)
    calls: list[BatchNormCall] = []
    functional_index = 0
    named = dict(model.named_modules())
    seen_call_keys: set[str] = set()
    for node in program.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        owner = owner_from_stack(node.meta.get("nn_module_stack"))
        shape = shape_of(node.args[0].meta.get("val")) if node.args and isinstance(node.args[0], fx.Node) else None
        location = location_from_stack_trace(node.meta.get("stack_trace"))
        order = graph_order(node, {}) if shape is not None and len(shape) == 3 else ""
        if owner in named and is_batchnorm_like(named[owner]):
            call_key = list(node.meta["nn_module_stack"])[-1]  # unique per call ("...bn@1" on reuse)
            if call_key in seen_call_keys:
                continue  # one module call can lower to several batch_norm ops
            seen_call_keys.add(call_key)
            calls.append(
                BatchNormCall(name=owner, module=owner, owner=owner, input_shape=shape, called_at=location, order=order)
            )
        else:
            name = "batch_norm" if functional_index == 0 else f"batch_norm_{functional_index}"
            functional_index += 1
            training = "no_training" not in str(node.target) and bool(node.args[5] if len(node.args) > 5 else False)
            calls.append(
                BatchNormCall(
                    name=name,
                    module=None,
                    owner=owner,
                    input_shape=shape,
                    called_at=location,
                    training=training,
                    order=order,
                )
            )
    return Capture("export", calls, None)
