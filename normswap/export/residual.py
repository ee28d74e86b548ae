"""Residual BatchNorm: what is left in a converted model that the plan did not keep on purpose."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..capture.tracer import BATCH_NORM_FUNCTIONS, is_batch_norm_call
from ..plan import Plan
from ..torchutil import as_input_tuple, is_replacement, preserved


def residual_batchnorm(model: nn.Module, plan: Plan | None = None) -> list[str]:
    """Names of BatchNorm modules (and functional graph nodes) in `model` the plan did not keep."""
    kept = {e.name for e in (plan or []) if e.keeps_batchnorm_op}
    left = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and not is_replacement(m) and name not in kept]
    if isinstance(model, fx.GraphModule):
        left += [n.name for n in model.graph.nodes if is_batch_norm_call(n) and n.name not in kept]
    return left


class _BatchStatisticsCounter(TorchFunctionMode):
    """Counts batch_norm calls that normalize with batch statistics (training=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in BATCH_NORM_FUNCTIONS:
            training_index = 5
            training = kwargs.get("training", args[training_index] if len(args) > training_index else False)
            self.count += bool(training)
        return func(*args, **kwargs)


def count_batch_statistics_calls(model: nn.Module, example_inputs: Any, train: bool = True) -> int:
    """Run `model` once (train or eval mode, no gradients, state restored) and count the
    batch_norm calls that used batch statistics."""
    inputs = as_input_tuple(example_inputs)
    with preserved(model), torch.no_grad():
        model.train(train)
        counter = _BatchStatisticsCounter()
        with counter:
            model(*inputs)
    return counter.count
