"""torch.fx helpers shared by capture and the graph passes: the tracer and batch_norm call matching."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .source import user_frame_location
from .norms import ChannelLayerNorm, FrozenBatchNorm, GroupNorm, is_swapped

# Functions whose FX call_function node means "batch_norm semantics used inline in forward".
BATCH_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm)

_LEAF_TYPES = (_BatchNorm, ChannelLayerNorm, FrozenBatchNorm, GroupNorm)


CALL_SITE_META = "normswap_call_site"


class BatchNormTracer(fx.Tracer):
    """Symbolic tracer that keeps every BatchNorm (subclasses included) and every normswap
    replacement as one leaf `call_module` node, and records the user's source line of each
    BatchNorm call in node.meta["normswap_call_site"] (only those: torch's `record_stack_traces`
    formats a whole stack for every node, which dominated lint time on deep models)."""

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if (kind == "call_function" and target in BATCH_NORM_FUNCTIONS) or (
            kind == "call_module" and is_batchnorm_like(self.root.get_submodule(target))
        ):
            node.meta[CALL_SITE_META] = user_frame_location(skip=2)
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAF_TYPES) or is_batchnorm_like(m) or super().is_leaf_module(m, module_qualified_name)


def is_batchnorm_like(module: nn.Module) -> bool:
    """BatchNorm or a look-alike (a class named *BatchNorm*), excluding normswap's own replacements."""
    if is_swapped(module):
        return False
    return isinstance(module, _BatchNorm) or "BatchNorm" in type(module).__name__


def is_batch_norm_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in BATCH_NORM_FUNCTIONS


def batch_norm_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of an `F.batch_norm` / `torch.batch_norm` node under F.batch_norm's names."""
    if node.target is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    else:  # torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")
        defaults = {}
    values = dict(defaults)
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return values


def describe_node(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A short human label for a graph node: 'conv1 (Conv2d)', 'relu', 'input x', 'output'."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return f"{node.target} ({type(module).__name__})" if module is not None else str(node.target)
    if node.op == "placeholder":
        return f"input {node.target}"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def parent_and_attribute(root: nn.Module, qualified_name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of a submodule, for setattr-style replacement."""
    parent_name, _, attribute = qualified_name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attribute
