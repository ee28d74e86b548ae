"""NS901 not-traceable: symbolic tracing failed; a fallback capture was used."""

from __future__ import annotations

from typing import Any

from ..context import Context
from .base import Finding, Rule, Severity, SourceFix


class NotTraceable(Rule):
    """## What it does
    Reports that torch.fx could not trace the model symbolically, and which capture normswap used
    instead (torch.export, or forward hooks on the module tree).

    ## Why is this bad?
    Fallback captures still find BatchNorm modules, their shapes and reuse, but with forward hooks
    there is no graph: producers / consumers are unknown, so rules that need them (NS301) stay
    quiet, and functional `batch_norm` calls can be reported but not rewritten.

    ## Example
    ```python
    def forward(self, x):
        if x.sum() > 0:        # data-dependent control flow
            ...
    ```

    ## Fix safety
    No fix: make forward traceable (e.g. `torch.fx.wrap` the offending function) for full analysis.

    ## References
    - torch.fx documentation, "Limitations of Symbolic Tracing".
    """

    code = "NS901"
    name = "not-traceable"
    severity = Severity.INFO
    summary = "Symbolic tracing failed; a fallback capture was used."
    source_fix = SourceFix.NEVER  # no fix

    def check_model(self, capture: Any, context: Context) -> list[Finding]:
        if capture.method == "fx":
            return []
        why = capture.fallback_reasons[0] if capture.fallback_reasons else "symbolic tracing failed"
        return [self.finding(None, f"torch.fx could not trace the model ({why}); captured with {capture.method}.")]
