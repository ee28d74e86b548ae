"""NS301 foldable-into-conv: inference only, BatchNorm right after conv/linear: fold, do not swap."""

from __future__ import annotations

from .. import targets
from ..context import Context
from ..sites import Site
from ..targets import PlanOptions, Refusal
from .base import Finding, FixSafety, Remedy, Rule, Severity, Skip, SourceFix


class FoldableIntoConv(Rule):
    """## What it does
    For inference-only models, reports BatchNorm with running statistics applied directly to the
    output of a convolution or linear layer that nothing else uses.

    ## Why is this bad?
    It is not: in eval mode such a BatchNorm is a fixed per-channel affine that can be folded
    into the preceding weights, for free. Swapping it for GroupNorm would *add* a per-sample
    reduction at inference and change the function.

    ## Example
    ```python
    y = self.bn(self.conv(x))    # served only
    ```

    ## Fix safety
    Safe: `fold` scales the convolution's weights and shifts its bias by BatchNorm's eval-mode
    affine (computed in float64), so the function is kept and no normalization op is left.

    ## References
    - Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference. CVPR 2018, section 3.2 (batch norm folding).
    - torch.fx `experimental/optimization.py` (`fuse`), onnxscript's batchnorm fusion rewrite rule.
    """

    code = "NS301"
    name = "foldable-into-conv"
    severity = Severity.INFO
    summary = "Inference only and BatchNorm directly after conv/linear: fold instead of swap."
    fix_safety = FixSafety.SAFE
    source_fix = SourceFix.NEVER  # fold changes weights, not code

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not context.inference_only:
            return self.skip("the model will be trained")
        try:
            params, _ = targets.get("fold").plan(site, PlanOptions())
        except Refusal as refusal:
            return self.skip(f"cannot be folded: {refusal}")
        producer = site.producers[0]
        return self.finding(
            site,
            f"'{site.name}' follows {producer} and is a fixed affine at inference: fold it, do not swap.",
            Remedy("fold", True, f"fold into '{params['into']}': the same function with no normalization op left"),
        )
