"""Pass infrastructure: requires -> call -> ensures, composed by a PassManager (after onnx-ir / torch.fx).

Each pass declares whether it works in place (it modifies the model it is given and returns that
object) or returns a new model leaving its input alone; the manager checks the declaration. A
failure inside a pass that is not already one of normswap's sentences is wrapped in a PassError
naming the pass and the node or layer it was working on, raised from the original.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from torch import fx, nn

from normswap.errors import NormswapError


class PassError(NormswapError):
    """A pass failed in a way normswap did not foresee: a bug, reported with the pass and the node."""

    exit_code = 3


@dataclass
class PassResult:
    """The (possibly new) model, whether anything changed, and one line per change."""

    model: nn.Module
    modified: bool
    changes: list[str] = field(default_factory=list)


class Pass:
    """A transformation of a model. `requires` checks preconditions, `call` does the work,
    `ensures` checks postconditions; all three raise normswap errors, never assert. While it works
    on a node or layer, `call` says which with `working_on`, so that a failure names it."""

    in_place: ClassVar[bool] = True

    def __init__(self) -> None:
        self.current = ""

    @property
    def name(self) -> str:
        return type(self).__name__

    @contextlib.contextmanager
    def working_on(self, what: fx.Node | str) -> Iterator[None]:
        self.current = (what.format_node() or what.name) if isinstance(what, fx.Node) else what
        yield
        self.current = ""

    def requires(self, model: nn.Module) -> None:
        """Raise if the pass cannot run on `model`."""

    def call(self, model: nn.Module) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: nn.Module) -> None:
        """Raise if the result does not hold what the pass promises."""

    def __call__(self, model: nn.Module) -> PassResult:
        return PassManager([self])(model)


class PassManager:
    """Runs passes in order, feeding each the previous result's model. Every pass's `requires`
    runs first, on the model as given, so a plan that does not fit fails before anything changes
    (the passes here check independent parts of the model)."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def __call__(self, model: nn.Module) -> PassResult:
        for p in self.passes:
            _guarded(p, "checking its preconditions", p.requires, model)
        changes: list[str] = []
        modified = False
        for p in self.passes:
            result = _guarded(p, "running", p.call, model)
            if (result.model is model) != p.in_place:
                declared = "works in place" if p.in_place else "returns a new model"
                raise PassError(
                    f"Pass {p.name} declares that it {declared}, but it did not; this is a bug in normswap."
                )
            _guarded(p, "checking its result", p.ensures, result.model)
            model = result.model
            modified |= result.modified
            changes.extend(result.changes)
        return PassResult(model, modified, changes)


T = TypeVar("T")


def _guarded(p: Pass, doing: str, step: Callable[[nn.Module], T], model: nn.Module) -> T:
    """`step(model)`, with a foreign exception wrapped in a PassError naming the pass and node."""
    try:
        return step(model)
    except NormswapError:
        raise
    except Exception as exc:  # a failure normswap did not foresee: named, chained, reported as a bug
        where = f" at `{p.current}`" if p.current else ""
        raise PassError(f"Pass {p.name} failed while {doing}{where}: {type(exc).__name__}: {exc}") from exc
