"""NS301 foldable-into-conv: inference only, BatchNorm right after conv/linear: fold, do not swap."""
from __future__ import annotations

import re

from ..context import Context
from ..sites import Site
from .base import Finding, Fix, Rule, Severity, Skip

_FOLDABLE_PRODUCER = re.compile(r"\((Conv[123]d|ConvTranspose[123]d|Linear|LazyConv[123]d|LazyLinear)\)$")


class FoldableIntoConv(Rule):
    """## What it does
    For inference-only models, reports BatchNorm with running statistics applied directly to the
    output of a convolution or linear layer.

    ## Why is this bad?
    It is not: in eval mode such a BatchNorm is a fixed per-channel affine that exporters and
    runtimes fold into the preceding weights, for free. Swapping it for GroupNorm would *add* a
    per-sample reduction at inference and change the function.

    ## Example
    ```python
    y = self.bn(self.conv(x))    # served only
    ```

    ## Fix safety
    Safe: `frozen` keeps the eval-mode function exactly, and onnxruntime folds the resulting
    BatchNormalization into the Conv.

    ## References
    - Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference. CVPR 2018, section 3.2 (batch norm folding).
    """

    code = "NS301"
    name = "foldable-into-conv"
    severity = Severity.INFO
    summary = "Inference only and BatchNorm directly after conv/linear: fold instead of swap."
    fix_safe = True

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not context.inference_only:
            return self.skip("the model will be trained")
        if not site.track_running_stats or site.batch_dependent_eval:
            return self.skip("no running statistics to fold")
        producer = next((p for p in site.producers if _FOLDABLE_PRODUCER.search(p)), None)
        if producer is None:
            return self.skip("not directly after a conv / linear layer")
        return self.finding(
            site,
            f"'{site.name}' follows {producer} and is a fixed affine at inference: fold it, do not swap.",
            Fix("frozen", True, "freeze (exact eval function); onnxruntime folds it into the conv"),
        )
