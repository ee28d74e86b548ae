"""NS205 unreached-batchnorm: a BatchNorm layer the example inputs did not reach."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip


class UnreachedBatchNorm(Rule):
    """## What it does
    Lists the BatchNorm layers that forward did not reach on the example inputs: a branch other
    inputs take, one of several per-domain layers a forward argument selects (a `ModuleDict`),
    an auxiliary head used only in training.

    ## Why is this bad?
    Nothing about them was observed. Inputs that do reach them normalize with batch statistics
    like any BatchNorm, so they matter as much as the layers that ran; but their input shapes
    are unknown, so `convert` replaces them from their constructor arguments alone (channels,
    eps, affine), and validation cannot exercise them.

    ## Example
    ```python
    self.norms = nn.ModuleDict({"photo": nn.BatchNorm2d(64), "sketch": nn.BatchNorm2d(64)})

    def forward(self, x, domain="photo"):
        return self.norms[domain](self.conv(x))
    ```

    ## Fix safety
    Unsafe, as the layer's replacement is. Give example inputs that reach it (for a forward
    argument: through the API) to have its shapes checked too.

    ## References
    - torch.fx documentation: tracing records the path the example inputs take.
    """

    code = "NS205"
    name = "unreached-batchnorm"
    severity = Severity.INFO
    summary = "A BatchNorm layer the example inputs did not reach: replaced from its constructor arguments."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if site.reached:
            return self.skip("reached by the example inputs")
        return self.finding(
            site,
            f"'{site.name}' ({site.flavour}) was not reached by the example inputs: other inputs may reach it, and convert replaces it "
            "from its constructor arguments, unchecked by validation.",
            self.natural_remedy(site, context),
        )
