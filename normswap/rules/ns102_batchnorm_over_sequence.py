"""NS102 batchnorm-over-sequence: BatchNorm1d normalizing an (N, C, L) sequence."""

from __future__ import annotations

from .. import policy
from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip, shape_text


class BatchNormOverSequence(Rule):
    """## What it does
    Flags BatchNorm whose input is an (N, C, L) sequence, i.e. whose statistics are pooled over
    the batch *and* every time step. A rank-3 input alone is no evidence of time: the rule needs
    evidence of order along L, a recurrent layer or a 1-d convolution or pooling whose kernel (or
    dilation) spans several steps upstream of the BatchNorm, a recurrent layer reading its output
    a few operations downstream, or `--sequence` (`sequence = true` in
    `[tool.normswap]`), which reads every rank-3 input as time steps. A point set (PointNet's
    (N, C, points) after kernel-1 convolutions, max-pooled over the points) has no order: it is
    planned like the pixels of a feature map (GroupNorm).

    ## Why is this bad?
    Statistics are shared by all positions and all samples: padding tokens and variable lengths
    change them, a sample's output depends on the lengths of the others in its batch, and a long
    sequence at inference sees statistics learned on short ones.

    ## Example
    ```python
    self.bn = nn.BatchNorm1d(128)
    y = self.bn(self.conv(x))     # x: (N, 128, L)
    ```

    ## Fix safety
    Unsafe: a channel LayerNorm (per time step) changes the function; calibrate a trained model.

    ## References
    - Ba, Kiros, Hinton. Layer Normalization. 2016.
    - Shen et al. PowerNorm: Rethinking Batch Normalization in Transformers. ICML 2020.
    """

    code = "NS102"
    name = "batchnorm-over-sequence"
    severity = Severity.WARNING
    summary = "BatchNorm normalizes an ordered (N, C, L) sequence over batch and time."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if site.input_rank != 3:
            return self.skip(f"input {shape_text(site)} is not an (N, C, L) sequence")
        if not policy.over_sequence(site, context):
            return self.skip(
                f"a {site.flavour} on a rank-3 input with no evidence of order along its last axis "
                "(no recurrent layer or 1-d kernel above 1 upstream, no recurrent layer reading it: a point set, say); pass --sequence if it is time"
            )
        if site.call_count > 1:
            return self.skip("reported as batchnorm-in-recurrence (NS101)")
        padding = "; padded steps of shorter sequences change the statistics" if context.sequence else ""
        evidence = f" (its steps are ordered: {site.order})" if site.order else ""
        return self.finding(
            site,
            f"'{site.name}' normalizes the sequence {shape_text(site)}{evidence} with statistics pooled over batch and time steps{padding}.",
            self.natural_remedy(site, context),
        )
