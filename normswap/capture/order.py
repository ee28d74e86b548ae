"""Evidence that a rank-3 (N, C, L) input is ordered along L (time steps), not an unordered set of
points: a layer upstream that reads neighbours along the axis (a 1-d convolution or pooling with
a kernel or dilation above 1) or a recurrent layer, or a recurrent layer that reads the output a
few operations downstream (`lstm(bn(x).transpose(1, 2))`). Each is described as a clause: "it
follows conv1 (Conv1d, kernel 3)", "it feeds lstm (LSTM, recurrent)"."""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from torch import fx, nn

_RECURRENT_OPS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# recurrent layers that are not nn.RNNBase: Opacus' DPLSTM / DPGRU / DPRNN, a user's own LSTM
_RECURRENT_CLASS = re.compile(r"(LSTM|GRU|RNN)$")
_CONVOLUTION_OPS = ("conv1d", "convolution", "conv_transpose1d")
_MAX_WALK = 5000  # graph nodes visited per site: a long way upstream, never the whole of a huge graph
# operations between the output and a recurrent layer that reads it (a transpose, an activation,
# dropout): further down, a reduction over L may have come between
_MAX_HOPS_DOWN = 4


def module_order(module: nn.Module) -> str:
    """Why `module`'s output is ordered along its last axis ("" when it says nothing about order):
    recurrence, or a 1-d kernel or dilation spanning several steps."""
    if isinstance(module, nn.RNNBase) or _RECURRENT_CLASS.search(type(module).__name__):
        return f"{type(module).__name__}, recurrent"
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d)):
        kernel = _first(module.kernel_size)
        dilation = _first(getattr(module, "dilation", 1))
        if kernel > 1:
            return f"{type(module).__name__}, kernel {kernel}"
        if dilation > 1:
            return f"{type(module).__name__}, dilation {dilation}"
    return ""


def graph_order(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """Why `node`'s steps are ordered, as a clause: the nearest layer upstream of its input that
    shows it ("it follows conv1 (Conv1d, kernel 3)"), else a recurrent layer within a few
    operations downstream ("it feeds lstm (LSTM, recurrent)"); "" when nothing does (a point set:
    kernel-1 convolutions)."""
    queue = deque(node.all_input_nodes[:1])
    seen: set[fx.Node] = set(queue)
    while queue and len(seen) < _MAX_WALK:
        current = queue.popleft()
        found = _node_order(current, modules)
        if found:
            return f"it follows {found}"
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return _recurrent_reader(node, modules)


def _recurrent_reader(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    frontier, seen = list(node.users), set(node.users)
    for _ in range(_MAX_HOPS_DOWN):
        for current in frontier:
            found = _node_order(current, modules)
            if "recurrent" in found:
                return f"it feeds {found}"
        frontier = [user for current in frontier for user in current.users if user not in seen]
        seen.update(frontier)
    return ""


def _node_order(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        why = module_order(module) if module is not None else ""
        return f"{node.target} ({why})" if why else ""
    if node.op != "call_function":
        return ""
    name = str(getattr(node.target, "__name__", node.target)).lower()
    where = _module_path(node)
    if any(op in name for op in _RECURRENT_OPS):
        return f"{where} (recurrent)"
    if any(op in name for op in _CONVOLUTION_OPS) and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        shape = getattr(node.args[1].meta.get("val"), "shape", None)
        dilation = node.args[5] if len(node.args) > 5 and isinstance(node.args[5], (list, tuple)) else (1,)
        if shape is not None and len(shape) == 3 and (int(shape[-1]) > 1 or _first(dilation) > 1):
            return f"{where} (1-d convolution, kernel {int(shape[-1])})"
    return ""


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return str(list(stack.values())[-1][0]).split("@")[0] if stack else node.name


def _first(value: Any) -> int:
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)
