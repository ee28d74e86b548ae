"""Residual BatchNorm: what is left in a converted model that the plan did not keep on purpose."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..capture.tracer import is_batch_norm_call
from ..plan import Plan
from ..postcondition import batch_statistics_users
from ..torchutil import as_input_tuple, is_replacement


def residual_batchnorm(model: nn.Module, plan: Plan | None = None) -> list[str]:
    """Names of BatchNorm modules (and functional graph nodes) in `model` the plan did not keep."""
    kept = {e.name for e in (plan or []) if e.keeps_batchnorm_op}
    left = [
        name
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and not is_replacement(m) and name not in kept
    ]
    if isinstance(model, fx.GraphModule):
        left += [n.name for n in model.graph.nodes if is_batch_norm_call(n) and n.name not in kept]
    return left


def count_batch_statistics_calls(
    model: nn.Module, example_inputs: Any, train: bool = True, owners: Sequence[str] = ()
) -> int:
    """Run `model` once (its normalization layers and the `owners` of functional batch_norm calls
    in train mode, or all in eval mode; no gradients; state restored) and count the batch_norm
    calls that used batch statistics."""
    return len(batch_statistics_users(model, as_input_tuple(example_inputs), train, owners))
