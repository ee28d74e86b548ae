"""NS202 batchnorm-subclass: a BatchNorm subclass that adds behaviour a swap must keep."""

from __future__ import annotations

from ..context import Context
from ..sites import Site, SiteKind
from .base import Finding, FixSafety, Rule, Severity, Skip, SourceFix


class BatchNormSubclass(Rule):
    """## What it does
    Reports a subclass of a torch BatchNorm class that overrides `forward`, e.g. timm's
    activation-fused `BatchNormAct2d` (normalize, then dropout and an activation), and says what a
    swap keeps and what it changes.

    ## Why is this bad?
    Replacing the module with a plain `nn.GroupNorm` silently drops the extra behaviour (the
    activation), which breaks the model without any error. normswap keeps the instance, its class
    (`isinstance(m, nn.BatchNorm2d)` still holds), its forward, submodules and parameter names, and
    takes over only the normalization: every `batch_norm` call its forward makes, whether it calls
    `F.batch_norm` itself or `super().forward()`. A subclass that computes its batch statistics by
    hand (no `batch_norm` call) cannot be taken over and is reported as such.

    ## Example
    ```python
    class BatchNormAct2d(nn.BatchNorm2d):
        def forward(self, x):
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training, self.momentum, self.eps)
            return self.act(self.drop(x))
    ```

    ## Fix safety
    Unsafe like any swap (the normalization changes); the subclass's own behaviour is kept.

    ## References
    - timm `layers/norm_act.py`, `BatchNormAct2d`: the most common BatchNorm class in timm's conv families.
    - detectron2 `layers/batch_norm.py`, `NaiveSyncBatchNorm`: statistics computed by hand.
    """

    code = "NS202"
    name = "batchnorm-subclass"
    severity = Severity.INFO
    summary = "A BatchNorm subclass adds behaviour that a swap must keep."
    fix_safety = FixSafety.UNSAFE
    source_fix = SourceFix.NEVER  # its class, not the line that builds it, is the BatchNorm

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if site.kind is not SiteKind.SUBCLASS or not site.overrides_forward:
            return self.skip("not a BatchNorm subclass with its own forward")
        if site.normalizes_by_hand:
            return self.finding(
                site,
                f"'{site.name}' is a {site.flavour} that computes its batch statistics by hand (no batch_norm call): "
                "normswap cannot take its normalization over; replace the class in your code.",
            )
        extras = f" and its submodules {', '.join(site.submodules)}" if site.submodules else ""
        remedy = self.natural_remedy(site, context)
        return self.finding(
            site,
            f"'{site.name}' is a {site.flavour}, a BatchNorm subclass with its own forward: a swap keeps its class, forward{extras}, "
            f"and replaces only its batch normalization ({remedy.target}).",
            remedy,
        )
