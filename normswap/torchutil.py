"""Small torch helpers every layer uses: model state kept intact, example inputs, scoped quiet."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import pickletools
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten


class Timings:
    """Seconds spent per named step of one piece of work (a step measured twice adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def update(self, other: Mapping[str, float]) -> None:
        self.seconds.update(other)


class Replacement:
    """Marks a module normswap built in place of a BatchNorm (never reported as BatchNorm again)."""


def module_class(module: nn.Module) -> type:
    """The module's own class, seen through the class `torch.nn.utils.parametrize` injects over it."""
    from torch.nn.utils import parametrize

    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def torch_base(cls: type) -> type:
    """The torch.nn BatchNorm class a BatchNorm class is or derives from (`_BatchNorm` itself for
    a class built on the base, such as pytorch-deeplab-xception's SynchronizedBatchNorm2d)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return next(k for k in cls.__mro__ if issubclass(k, _BatchNorm) and k.__module__.startswith("torch.nn"))


def is_torch_class(module: nn.Module) -> bool:
    """A class of torch.nn itself (not a user's subclass of one)."""
    return module_class(module).__module__.startswith("torch.nn")


def is_replacement(module: nn.Module) -> bool:
    return isinstance(module, Replacement)


def tensor_attribute(module: Any, name: str) -> torch.Tensor | None:
    """`module.<name>` when it is a tensor (a parameter or buffer), else None."""
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def as_input_tuple(example_inputs: Any) -> tuple:
    """Normalize example inputs (a tensor or a tuple/list of tensors) to a tuple.

    Raises:
        TypeError: anything else (an API misuse, not a user-input problem).
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}.")


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a (possibly nested tuple / dict) model output, in a stable order; Python
    numbers among them (an auxiliary count, a constant) become 0-dimensional tensors, as the ONNX
    export writes them."""
    leaves, _ = tree_flatten(output)
    return [
        leaf if isinstance(leaf, torch.Tensor) else torch.as_tensor(leaf)
        for leaf in leaves
        if isinstance(leaf, (torch.Tensor, bool, int, float))
    ]


def has_number_outputs(output: Any) -> bool:
    """Whether a model output holds Python numbers beside (or instead of) tensors."""
    leaves, _ = tree_flatten(output)
    return any(isinstance(leaf, (bool, int, float)) for leaf in leaves)


def require_module(model: Any, function: str) -> nn.Module:
    """`model` itself; TypeError when an API function is called with something else, and
    CaptureError for a TorchScript module (normswap reads and rewrites eager Python modules)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{function}() needs a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, torch.jit.ScriptModule):
        from .errors import CaptureError

        raise CaptureError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script / trace), which normswap cannot rewrite; "
            "convert the eager model, then script the converted one."
        )
    return model


def require_type(value: Any, expected: type | tuple[type, ...], argument: str, function: str, hint: str = "") -> None:
    """TypeError when an API function's `argument` is not of the `expected` type (None passes)."""
    if value is not None and not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise TypeError(
            f"{function}(): {argument} must be a {names}, got {type(value).__name__}{f'; {hint}' if hint else ''}."
        )


def resolve_batch_inputs(inputs: Sequence[Any], batch_inputs: Sequence[int] | None = None) -> tuple[int, ...]:
    """Indices of the inputs whose dim 0 is the batch.

    Given explicitly, they are checked; by default they are the tensor inputs whose dim 0 equals
    the first tensor input's (a graph's `edge_index` of shape (2, E) beside node features of
    shape (N, F) is not a batch input).

    Raises:
        ValueError: an index that names no tensor input with a dim 0.
    """
    tensors = {i: x for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.dim() > 0}
    if batch_inputs is not None:
        wrong = [i for i in batch_inputs if i not in tensors]
        if wrong:
            raise ValueError(
                f"batch_inputs {wrong} name no tensor input with a batch axis; the model has {len(inputs)} input(s)."
            )
        return tuple(sorted(set(batch_inputs)))
    if not tensors:
        return ()
    first = next(iter(tensors.values())).shape[0]
    return tuple(i for i, x in tensors.items() if x.shape[0] == first)


def batch_size_of(inputs: Sequence[Any], batch_inputs: Sequence[int] | None = None) -> int:
    """The batch size: dim 0 of the first input that carries the batch (1 when none does)."""
    indices = range(len(inputs)) if batch_inputs is None else batch_inputs
    for index in indices:
        x = inputs[index]
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return 1


def batch_of(inputs: Sequence[Any], size: int, batch_inputs: Sequence[int] | None = None) -> tuple:
    """The inputs with batch size `size`: a slice, or the batch repeated along dim 0.

    Only the inputs listed in `batch_inputs` (default: every tensor input) are resized.
    """
    indices = set(range(len(inputs)) if batch_inputs is None else batch_inputs)
    resized = []
    for index, x in enumerate(inputs):
        if index not in indices or not isinstance(x, torch.Tensor) or x.dim() == 0:
            resized.append(x)
            continue
        repeats = -(-size // x.shape[0])
        resized.append(x.repeat(repeats, *([1] * (x.dim() - 1)))[:size] if repeats > 1 else x[:size])
    return tuple(resized)


def parent_and_attribute(root: nn.Module, qualified_name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of a submodule, for setattr-style replacement."""
    parent_name, _, attribute = qualified_name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attribute


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one bounded piece of work.

    Copying, tracing and running a model allocate many objects; each full collection rescans
    every object the model owns, so with the collector on, time grows faster than the graph
    (x14 for x10 the blocks on a conv-BN chain, benchmarks/bench_scaling.py). Collection resumes
    afterwards, as it was.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_STATE_DICTS = ("_parameters", "_buffers", "_modules")


def _tables(module: nn.Module) -> tuple[str, ...]:
    """The dict-valued tables of a module restored by content (the same objects stay, so users'
    hook handles keep working): parameters, buffers, submodules and every hook table. A forward
    that registers hooks on its first call and marks that in an attribute (transformers' output
    recorders do) must lose both, or the next call registers them twice."""
    return (
        *_STATE_DICTS,
        *(key for key, value in module.__dict__.items() if "hook" in key and isinstance(value, dict)),
    )


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore the model's training flags, instance attributes, hooks, classes and buffers on exit."""
    saved = []
    for module in model.modules():
        state = dict(module.__dict__)
        for key in _tables(module):
            state[key] = dict(module.__dict__[key])
        buffers = {
            name: b.detach().clone()
            for name, b in module._buffers.items()
            if isinstance(b, torch.Tensor) and not isinstance(b, nn.parameter.UninitializedBuffer)
        }
        saved.append((module, module.__class__, state, buffers))
    try:
        yield
    finally:
        for module, cls, state, buffers in saved:
            module.__class__ = cls
            tables = [key for key in _tables(module) if key in state]
            for key in tables:
                module.__dict__[key].clear()
                module.__dict__[key].update(state[key])
            for key in list(module.__dict__):
                if key not in state:
                    del module.__dict__[key]
            for key, value in state.items():
                if key not in tables:
                    module.__dict__[key] = value
            with torch.no_grad():
                for name, value in buffers.items():
                    slot = module._buffers[name]
                    if slot is not None:
                        slot.copy_(value)


# Loggers whose warnings are expected while normswap tries a capture or an export that may fail
# (torch.export guard messages, the ONNX exporter's "torchvision is not installed", onnxscript's
# failed opset conversion, which export_onnx then lowers itself or refuses in a sentence).
_NOISY_LOGGERS = (
    "torch.export",
    "torch._export",
    "torch.fx.experimental.symbolic_shapes",
    "torch._dynamo",
    "torch.onnx",
    "onnxscript",
)


class _DropTorchExportPrints(io.TextIOBase):
    """stderr that drops only what torch.export's wrapper `print`s (the partial graph of a failed
    export); every other write, from any thread or library, passes through unchanged."""

    _SOURCE = os.path.join("torch", "export", "_trace.py")

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if sys._getframe(1).f_code.co_filename.endswith(self._SOURCE):
            return len(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's expected noise around one call: raise the level of torch's own export and
    ONNX loggers, filter warnings, and drop torch.export's partial-graph print. Nothing else the
    process logs or prints is touched."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    stderr = sys.stderr
    sys.stderr = _DropTorchExportPrints(stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr = stderr
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def pickle_globals(path: Path, limit: int = 200_000) -> list[str]:
    """The `module.name` globals a pickle (plain, or a torch zip's data.pkl) would import, read
    with pickletools without running anything."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                inner = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(inner) if inner else b""
        else:
            data = path.read_bytes()
        names: list[str] = []
        strings: list[str] = []
        for count, (opcode, argument, _) in enumerate(pickletools.genops(data)):
            if count > limit:
                break
            if isinstance(argument, str):
                strings.append(argument)
            if opcode.name == "GLOBAL" and isinstance(argument, str):
                names.append(argument.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
        # what torch.save itself writes (tensor rebuilds, OrderedDict) is not foreign code
        return list(
            dict.fromkeys(
                n for n in names if not n.startswith(("torch.", "collections.OrderedDict", "_codecs.", "builtins.set"))
            )
        )
    except Exception:  # noqa: BLE001 - only for the message: a file pickletools cannot walk gets none
        return []


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else free pages), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
