"""NS201 functional-batchnorm: a functional batch_norm call inside forward."""

from __future__ import annotations

from ..context import Context
from ..sites import Site, SiteKind
from .base import Finding, FixSafety, Rule, Severity, Skip


class FunctionalBatchNorm(Rule):
    """## What it does
    Reports `F.batch_norm(...)` / `torch.batch_norm(...)` called directly in a forward method.

    ## Why is this bad?
    It is not a problem by itself, but module walkers — `SyncBatchNorm.convert_sync_batchnorm`,
    Opacus' `ModuleValidator`, most "replace all BatchNorm" snippets — only look at submodules and
    miss it, so a model that "has no BatchNorm left" still normalizes over the batch.

    ## Example
    ```python
    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, self.w, self.b, training=self.training)
    ```

    ## Fix safety
    Unsafe: the replacement changes the function. normswap rewrites the call in the FX graph,
    so the converted model is an `fx.GraphModule`.

    ## References
    - torch.nn.functional.batch_norm documentation.
    """

    code = "NS201"
    name = "functional-batchnorm"
    severity = Severity.INFO
    summary = "A functional batch_norm call in forward, invisible to module walkers."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if site.kind is not SiteKind.FUNCTIONAL:
            return self.skip("a module, visible to module walkers")
        where = f" in '{site.owner}'" if site.owner else ""
        return self.finding(
            site,
            f"functional batch_norm '{site.name}'{where}: module-based tools (Opacus, convert_sync_batchnorm) do not see it.",
            self.natural_remedy(site, context),
        )
