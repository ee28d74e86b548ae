"""Walk a traced model one batch at a time, node by node, stopping at any cut.

A `Cursor` is one batch's forward pass through an fx graph, paused before a node. Its environment
holds only the values some later node still reads (fx's last-use analysis): the live set that
crosses the cut. Calibration keeps one cursor per batch and per model and moves them all from one
site to the next, so every node runs once per batch however many sites the model has.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from ..capture.tracer import BatchNormTracer


class Cursor(fx.Interpreter):
    """One batch's forward pass through `module`, run node by node from `position`."""

    def __init__(self, module: fx.GraphModule, inputs: tuple) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.nodes = list(module.graph.nodes)
        self.position = 0
        self.env = {}
        self.args_iter: Iterator[Any] = iter(module.graph.process_inputs(*inputs))
        self.substitutes: dict[str, nn.Module] = {}  # modules called in place of the graph's own

    def call_module(self, target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        substitute = self.substitutes.get(str(target))
        return substitute(*args, **kwargs) if substitute is not None else super().call_module(target, args, kwargs)

    @property
    def node(self) -> fx.Node:
        """The node the cursor stands before."""
        return self.nodes[self.position]

    def arguments(self) -> tuple[tuple, dict[str, Any]]:
        """The evaluated arguments of the node the cursor stands before."""
        return self.fetch_args_kwargs_from_env(self.node)

    def step(self) -> Any:
        """Run the node the cursor stands before, drop the values nothing later reads, move on."""
        node = self.node
        value = self.run_node(node)
        self.env[node] = value
        for dead in self.user_to_last_uses.get(node, ()):
            del self.env[dead]
        self.position += 1
        return value

    def run_to(self, position: int) -> None:
        while self.position < position:
            self.step()

    def finish(self) -> Any:
        """Run to the end and return the graph's output."""
        value = None
        while self.position < len(self.nodes):
            value = self.step()
        return value

    def branch(self) -> Cursor:
        """A copy that can run ahead without touching this cursor's values: they are cloned,
        because a node ahead may write into a tensor in place (`out += identity`)."""
        twin = copy.copy(self)
        twin.env = {node: tree_map(_cloned, value) for node, value in self.env.items()}
        return twin

    def live_bytes(self) -> int:
        """Bytes held by the tensors of the live set (each storage counted once)."""
        storages = {
            _storage_key(leaf): leaf.untyped_storage().nbytes()
            for leaf in tree_leaves(list(self.env.values()))
            if isinstance(leaf, torch.Tensor)
        }
        return sum(storages.values())


def _cloned(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() or id(tensor)


class _SiteLeaves(BatchNormTracer):
    """The tracer capture uses, with every module site kept whole as one node (a target defined
    outside normswap builds modules the tracer would otherwise trace through)."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        # without the user's source line of each BatchNorm call: calibration never reports it
        return fx.Tracer.create_node(self, kind, target, args, kwargs, name, type_expr)


def traced(model: nn.Module, leaves: set[str]) -> fx.GraphModule:
    """`model` as a graph whose module sites `leaves` are single call_module nodes; a model that
    already is one (convert's graph with functional sites rewritten) is used as it is."""
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _SiteLeaves(leaves)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
