"""NS107 batch-dependent-inference: BatchNorm that uses batch statistics even in eval mode."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip


class BatchDependentInference(Rule):
    """## What it does
    Flags BatchNorm that normalizes with the statistics of the current batch at inference: a
    module built with `track_running_stats=False`, or a functional `batch_norm(..., training=True)`.

    ## Why is this bad?
    In a served model, one request's prediction changes with the other requests batched next to
    it, and a batch of one sees only itself (one value per channel normalizes to zero). Results
    are not reproducible and the model cannot be exported as a per-sample function.

    ## Example
    ```python
    self.bn = nn.BatchNorm2d(64, track_running_stats=False)
    ```

    ## Fix safety
    Unsafe: GroupNorm / LayerNorm change the function (but make it per-sample).

    ## References
    - PyTorch documentation, BatchNorm2d: "track_running_stats".
    """

    code = "NS107"
    name = "batch-dependent-inference"
    severity = Severity.ERROR
    summary = "BatchNorm uses batch statistics at inference."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not site.batch_dependent_eval:
            return self.skip("uses running statistics in eval mode")
        why = "keeps no running statistics" if not site.track_running_stats else "is called with training=True"
        return self.finding(
            site,
            f"'{site.name}' {why}: in eval mode each sample's output depends on the rest of the batch.",
            self.natural_remedy(site, context),
        )
