"""Capture strategy 3: forward hooks on the module tree plus a TorchFunctionMode that sees
functional batch_norm calls made outside BatchNorm modules (works on any model that runs)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..source import user_frame_location
from ..torchutil import preserved
from .calls import BatchNormCall, Capture, run_eagerly, shape_of
from .order import module_order
from .tracer import BATCH_NORM_FUNCTIONS, BatchNormArgs, is_batchnorm_like


class _FunctionalBatchNormSpy(TorchFunctionMode):
    """Sees `F.batch_norm` / `torch.batch_norm` calls made outside any BatchNorm module."""

    def __init__(self, module_stack: list[tuple[str, nn.Module]], calls: list[BatchNormCall]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inside_norm = any(is_batchnorm_like(module) for _, module in self.module_stack)
        if func in BATCH_NORM_FUNCTIONS and not inside_norm:
            index = sum(1 for c in self.calls if c.module is None)
            arguments = BatchNormArgs.of(func, args, kwargs)
            self.calls.append(
                BatchNormCall(
                    name="batch_norm" if index == 0 else f"batch_norm_{index}",
                    module=None,
                    owner=self.module_stack[-1][0] if self.module_stack else "",
                    input_shape=shape_of(arguments.input),
                    called_at=user_frame_location(skip=2),
                    # hooks run the model in eval mode: the flag seen is the inference one
                    training_in_eval=bool(arguments.training),
                    arguments=dataclasses.replace(arguments, input=None),  # the state it reads, not the data
                )
            )
        return func(*args, **kwargs)


def capture_hooks(model: nn.Module, inputs: tuple) -> Capture:
    calls: list[BatchNormCall] = []
    stack: list[tuple[str, nn.Module]] = []
    handles = []

    ordered: list[str] = []  # without a graph: the last layer run so far that shows order (capture/order.py)

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            stack.append((name, module))
            why = module_order(module)
            if why:
                ordered.append(f"it follows {name} ({why}), run earlier in forward")
            if is_batchnorm_like(module) and not any(is_batchnorm_like(m) for _, m in stack[:-1]):
                shape = shape_of(args[0] if args else None)
                calls.append(
                    BatchNormCall(
                        name=name,
                        module=name,
                        owner=name,
                        input_shape=shape,
                        called_at=user_frame_location(skip=2),
                        order=ordered[-1] if ordered and shape is not None and len(shape) == 3 else "",
                    )
                )

        return hook

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        stack.pop()

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook))
        with _FunctionalBatchNormSpy(stack, calls):
            run_eagerly(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    functional = [call for call in calls if call.module is None]
    if functional:
        _training_flags(model, inputs, functional)
    return Capture("hooks", calls, None)


def _training_flags(model: nn.Module, inputs: tuple, functional: list[BatchNormCall]) -> None:
    """The `training` flag each functional call passes in train mode (`F.batch_norm(...,
    self.training)`): one more forward in train mode (state restored). A model that cannot run
    in train mode on these inputs (it wants labels) is taken to use batch statistics there."""
    seen: list[BatchNormCall] = []
    stack: list[tuple[str, nn.Module]] = []
    handles = []

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: stack.append((name, m))))
        handles.append(module.register_forward_hook(leave))
    try:
        with preserved(model), torch.no_grad(), _FunctionalBatchNormSpy(stack, seen):
            model.train()(*inputs)
    except Exception:  # noqa: BLE001 - train mode needs more than the example inputs: assume the worst (batch statistics)
        seen = []
    finally:
        for handle in handles:
            handle.remove()
    for index, call in enumerate(functional):
        call.training = bool(seen[index].training_in_eval) if index < len(seen) else True
