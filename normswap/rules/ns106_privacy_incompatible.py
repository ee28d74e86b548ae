"""NS106 privacy-incompatible: BatchNorm under differentially private training."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip


class PrivacyIncompatible(Rule):
    """## What it does
    Flags every batch-dependent BatchNorm when the model is trained with differential privacy
    (DP-SGD, e.g. Opacus).

    ## Why is this bad?
    DP-SGD clips and noises per-sample gradients. BatchNorm mixes the samples of a batch, so a
    sample's gradient depends on the others and the privacy accounting no longer holds; Opacus'
    validator rejects such models. Opacus' own fixer misses functional `F.batch_norm` calls,
    which normswap finds in the graph.

    ## Example
    ```python
    privacy_engine.make_private(module=model, ...)  # model holds nn.BatchNorm2d
    ```

    ## Fix safety
    Unsafe: GroupNorm changes the function. It is the replacement recommended by Opacus.

    ## References
    - Abadi et al. Deep Learning with Differential Privacy. CCS 2016.
    - Opacus, ModuleValidator.fix (replaces BatchNorm with GroupNorm).
    """

    code = "NS106"
    name = "privacy-incompatible"
    severity = Severity.ERROR
    summary = "BatchNorm mixes samples, which differential-privacy training forbids."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not context.differential_privacy:
            return self.skip("not trained with differential privacy")
        if not site.batch_dependent_train:
            return self.skip("does not use batch statistics in training")
        return self.finding(
            site,
            f"'{site.name}' mixes the samples of a batch, so per-sample gradients for DP-SGD are undefined.",
            self.natural_remedy(site, context),
        )
