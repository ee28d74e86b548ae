"""Pass infrastructure: requires -> call -> ensures, composed by a PassManager (after onnx-ir / torch.fx)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn


@dataclass
class PassResult:
    """The (possibly new) model, whether anything changed, and one line per change."""

    model: nn.Module
    modified: bool
    changes: list[str] = field(default_factory=list)


class Pass:
    """A transformation of a model. `requires` checks preconditions, `call` does the work,
    `ensures` checks postconditions; all three raise normswap errors, never assert."""

    def requires(self, model: nn.Module) -> None:
        """Raise if the pass cannot run on `model`."""

    def call(self, model: nn.Module) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: nn.Module) -> None:
        """Raise if the result does not hold what the pass promises."""

    def __call__(self, model: nn.Module) -> PassResult:
        self.requires(model)
        result = self.call(model)
        self.ensures(result.model)
        return result


class PassManager:
    """Runs passes in order, feeding each the previous result's model. Every pass's `requires`
    runs first, on the model as given, so a plan that does not fit fails before anything changes
    (the passes here check independent parts of the model)."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def __call__(self, model: nn.Module) -> PassResult:
        for p in self.passes:
            p.requires(model)
        changes: list[str] = []
        modified = False
        for p in self.passes:
            result = p.call(model)
            p.ensures(result.model)
            model = result.model
            modified |= result.modified
            changes.extend(result.changes)
        return PassResult(model, modified, changes)
