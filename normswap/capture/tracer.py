"""torch.fx pieces shared by capture, the targets and the graph passes: the tracer, and matching
and reading `batch_norm` calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..source import user_frame_location
from ..torchutil import is_replacement

# Functions whose call means "batch_norm semantics used inline in forward".
BATCH_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm)

CALL_SITE_META = "normswap_call_site"

F_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_F_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
# torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
TORCH_BATCH_NORM_ARGS = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)


@dataclass
class BatchNormArgs:
    """The arguments of one `F.batch_norm` / `torch.batch_norm` call under F.batch_norm's names.

    Values are tensors at run time, or fx.Nodes / constants in a graph.
    """

    input: Any
    running_mean: Any
    running_var: Any
    weight: Any
    bias: Any
    training: Any
    momentum: Any
    eps: Any

    @classmethod
    def of(cls, func: Any, args: tuple, kwargs: dict[str, Any] | None = None) -> BatchNormArgs:
        names = F_BATCH_NORM_ARGS if func is F.batch_norm else TORCH_BATCH_NORM_ARGS
        values: dict[str, Any] = dict(_F_DEFAULTS)
        values.update(zip(names, args, strict=False))  # positional arguments cover a prefix of the names
        values.update(kwargs or {})
        return cls(**{name: values.get(name) for name in F_BATCH_NORM_ARGS})

    @classmethod
    def of_node(cls, node: fx.Node) -> BatchNormArgs:
        return cls.of(node.target, node.args, dict(node.kwargs))

    def positional(self) -> tuple[Any, ...]:
        """F.batch_norm's arguments in its order: the same call again, or another function of them."""
        return tuple(getattr(self, name) for name in F_BATCH_NORM_ARGS)


class BatchNormTracer(fx.Tracer):
    """Symbolic tracer that keeps every BatchNorm (subclasses included), every look-alike and
    every normswap replacement as one leaf `call_module` node, and records the user's source
    line of each BatchNorm call in node.meta["normswap_call_site"] (only those: torch's
    `record_stack_traces` formats a whole stack for every node, which dominated lint time)."""

    # Buffers read in forward become graph values (`get_attr`), not constants folded at trace
    # time: a forward that reads `self.bn.running_var` shows it, and the graph stays true to the
    # weights loaded later.
    proxy_buffer_attributes = True

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if (kind == "call_function" and target in BATCH_NORM_FUNCTIONS) or (
            kind == "call_module" and is_batchnorm_like(self.root.get_submodule(target))
        ):
            node.meta[CALL_SITE_META] = user_frame_location(skip=2)
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_replacement(m) or is_batchnorm_like(m) or super().is_leaf_module(m, module_qualified_name)


def is_batchnorm_like(module: nn.Module) -> bool:
    """A BatchNorm site: a torch BatchNorm (or subclass), or a look-alike — a class named
    *BatchNorm* that is not one and holds none (a wrapper holding a torch BatchNorm, like PyG's,
    is looked through: the module inside is the site). normswap's own replacements are not."""
    if is_replacement(module):
        return False
    if isinstance(module, _BatchNorm):
        return True
    return "BatchNorm" in type(module).__name__ and not any(isinstance(m, _BatchNorm) for m in module.modules())


def is_batch_norm_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in BATCH_NORM_FUNCTIONS


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


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace with BatchNorm kept as leaves (mode as the model is)."""
    tracer = BatchNormTracer()
    graph = tracer.trace(model)
    for node in graph.nodes:
        if isinstance(node.type, str):  # a postponed annotation: FX writes it as a name TorchScript cannot resolve
            node.type = None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
