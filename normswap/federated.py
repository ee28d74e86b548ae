"""What a FedBN client keeps local: the state-dict names of every normalization site's parameters
and buffers, found in the model's graph (modules, subclasses, functional calls and the tensors they
pass), never by matching names."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import fx, nn

from .capture import capture
from .capture.hooks import capture_hooks
from .capture.tracer import BatchNormArgs
from .rewrite import materialize_lazy
from .sites import Site, SiteKind, discover
from .torchutil import as_input_tuple, require_module

V = TypeVar("V")
# the arguments of a batch_norm call that hold state (the input is data)
STATE_ARGUMENTS = ("running_mean", "running_var", "weight", "bias")


@dataclass(frozen=True)
class SiteState:
    """One normalization site and the state-dict entries it holds.

    site, kind, flavour: as in normswap's Site (`bn1`, "module", "BatchNorm2d"; a functional call
        is named after its graph node, `batch_norm`).
    parameters, buffers: state-dict keys (every name a tensor is stored under: a layer registered
        twice has two).
    notes: tensors the site uses that no state-dict entry holds (computed in forward, or a plain
        attribute), which no filter on the state dict can keep local.
    """

    site: str
    kind: str
    flavour: str
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.parameters, *self.buffers)


@dataclass(frozen=True)
class LocalState:
    """The state a FedBN client keeps local: per site (`sites`) and flat (`names`).

    `local(state_dict)` and `shared(state_dict)` split a state dict (the model's, or one that
    arrived from the server) into those entries and the rest, which FedAvg averages.
    """

    sites: tuple[SiteState, ...]
    names: frozenset[str]
    capture_method: str

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)

    def local(self, state_dict: Mapping[str, V]) -> dict[str, V]:
        """The entries of `state_dict` a FedBN client keeps (in its order)."""
        return {key: value for key, value in state_dict.items() if key in self.names}

    def shared(self, state_dict: Mapping[str, V]) -> dict[str, V]:
        """The entries of `state_dict` the clients share (what FedAvg averages)."""
        return {key: value for key, value in state_dict.items() if key not in self.names}


def local_state(model: nn.Module, example_inputs: Any) -> LocalState:
    """The state-dict names of every normalization site's parameters and buffers.

    Sites are what `normswap lint` finds: BatchNorm modules and subclasses (their own weight,
    bias, running statistics and step counter, not their submodules' such as an activation's),
    look-alikes (a frozen BatchNorm's buffers), layers the example does not reach, and functional
    `batch_norm` calls, whose running statistics, weight and bias are followed in the graph to
    the parameters and buffers they are read from.

    Args:
        model: the model (not modified; lazy layers are initialized by one eval forward).
        example_inputs: a tensor or tuple of tensors forward takes, batch first.

    Returns:
        LocalState: `.names` (a frozenset of state-dict keys), `.sites` (per site), and
        `.local(state_dict)` / `.shared(state_dict)` to split a state dict.

    Raises:
        TypeError: `model` is not a module.
        CaptureError: the model cannot run on `example_inputs`.
    """
    require_module(model, "local_state")
    inputs = as_input_tuple(example_inputs)
    materialize_lazy(model, inputs)
    captured = capture(model, inputs)
    sites = discover(model, captured)
    keys = _keys_by_tensor(model)
    functional = [site for site in sites if site.kind is SiteKind.FUNCTIONAL]
    arguments = _functional_arguments(model, inputs, captured.graph_module, functional)
    states = []
    for site in sites:
        if site.kind is SiteKind.FUNCTIONAL:
            states.append(_site_state(site, arguments.get(site.name, {}), keys))
        else:
            states.append(_from_module(site, model.get_submodule(site.name), keys))
    names = frozenset(name for state in states for name in state.names)
    return LocalState(tuple(states), names, captured.method)


def _keys_by_tensor(model: nn.Module) -> dict[int, list[str]]:
    """Every state-dict key under which each tensor object is stored."""
    found: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        found.setdefault(id(value), []).append(key)
    return found


def _site_state(site: Site, tensors: Mapping[str, Any], keys: dict[int, list[str]]) -> SiteState:
    """The site's entries: the keys of each of its tensors (by object, so aliases count), and a
    note for each tensor no entry holds (None: computed from no state at all)."""
    parameters: list[str] = []
    buffers: list[str] = []
    notes = []
    for role, tensor in tensors.items():
        stored = keys.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        if not stored:
            notes.append(f"its {role} is computed in forward or held outside the state dict")
            continue
        (parameters if isinstance(tensor, nn.Parameter) else buffers).extend(stored)
    return SiteState(
        site.name,
        site.kind.value,
        site.flavour,
        tuple(dict.fromkeys(parameters)),
        tuple(dict.fromkeys(buffers)),
        tuple(notes),
    )


def _from_module(site: Site, module: nn.Module, keys: dict[int, list[str]]) -> SiteState:
    """A module's own state: its parameters and persistent buffers, and the originals of its
    parametrized tensors, not its submodules' (an activation's)."""
    own: dict[str, torch.Tensor] = {}
    children = {name for name, _ in module.named_children()} - {"parametrizations"}
    for key, value in module.state_dict(keep_vars=True).items():
        if key.partition(".")[0] not in children:
            own[key] = value
    return _site_state(site, own, keys)


def _functional_arguments(
    model: nn.Module, inputs: tuple, graph: fx.GraphModule | None, sites: list[Site]
) -> dict[str, dict[str, torch.Tensor]]:
    """For each functional site, the state tensors its call reads, by role (`running_mean`...,
    or `weight (computed from log_scale)`): followed back in the FX graph when there is one, else
    the tensors passed when the model runs (then a computed one has no state-dict key)."""
    if not sites:
        return {}
    if graph is not None:
        nodes = {node.name: node for node in graph.graph.nodes}
        return {site.name: _graph_tensors(graph, nodes[site.name]) for site in sites if site.name in nodes}
    # no graph: the hooks capture sees the calls run, in the order that names them
    calls = [call for call in capture_hooks(model, inputs).calls if call.module is None]
    return {
        call.name: {
            role: getattr(call.arguments, role) for role in STATE_ARGUMENTS if getattr(call.arguments, role) is not None
        }
        for call in calls
        if call.arguments is not None
    }


def _graph_tensors(graph: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    """The tensors each state argument of a batch_norm node is read from: a `get_attr` directly,
    or the `get_attr` nodes its value is computed from (not through other modules' calls); None
    for an argument computed from no state."""
    call = BatchNormArgs.of_node(node)
    found: dict[str, Any] = {}
    for role in STATE_ARGUMENTS:
        argument = getattr(call, role)
        if not isinstance(argument, fx.Node):
            continue
        sources = _attributes_read(argument)
        for source in sources:
            label = role if source is argument else f"{role} (computed from {source.target})"
            found[label] = _fetch(graph, str(source.target))
        if not sources:
            found[role] = None
    return found


def _attributes_read(node: fx.Node) -> list[fx.Node]:
    """The `get_attr` nodes a value is computed from, through functions and methods only."""
    found, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            found.append(current)
        elif current.op in ("call_function", "call_method"):
            stack.extend(current.all_input_nodes)
    return found


def _fetch(graph: fx.GraphModule, target: str) -> Any:
    value: Any = graph
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


__all__ = ["LocalState", "SiteState", "local_state"]
