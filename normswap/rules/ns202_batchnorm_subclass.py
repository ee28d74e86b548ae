"""NS202 batchnorm-subclass: a BatchNorm subclass that adds behaviour a swap must keep."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, Rule, Severity, Skip


class BatchNormSubclass(Rule):
    """## What it does
    Reports a subclass of a torch BatchNorm class that overrides `forward`, e.g. an
    activation-fused `BatchNormAct2d` (normalize, then ReLU).

    ## Why is this bad?
    Swapping the module for a plain `nn.GroupNorm` silently drops the extra behaviour (the
    activation), which breaks the model without any error. normswap keeps the subclass and its
    forward, and replaces only the normalization that `super().forward()` performs.

    ## Example
    ```python
    class BatchNormAct2d(nn.BatchNorm2d):
        def forward(self, x):
            return F.relu(super().forward(x))
    ```

    ## Fix safety
    Unsafe like any swap, but the subclass's own behaviour is kept.

    ## References
    - timm.layers.norm_act.BatchNormAct2d, an example of such a subclass.
    """

    code = "NS202"
    name = "batchnorm-subclass"
    severity = Severity.INFO
    summary = "A BatchNorm subclass adds behaviour that a swap must keep."
    fix_safe = False

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if site.kind != "subclass" or not site.overrides_forward:
            return self.skip("not a BatchNorm subclass with its own forward")
        return self.finding(
            site,
            f"'{site.name}' is a {site.flavour}, a BatchNorm subclass with its own forward: its extra behaviour is kept by the swap.",
            self.natural_fix(site),
        )
