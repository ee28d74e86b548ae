"""NS102 batchnorm-over-sequence: BatchNorm1d normalizing an (N, C, L) sequence."""

from __future__ import annotations

from .. import policy
from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip, shape_text


class BatchNormOverSequence(Rule):
    """## What it does
    Flags BatchNorm1d whose input is a rank-3 (N, C, L) tensor, i.e. a sequence whose statistics
    are pooled over the batch *and* every time step. With `--sequence` (`sequence = true` in
    `[tool.normswap]`) every BatchNorm on a rank-3 input is read as over time steps.

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
    summary = "BatchNorm1d normalizes an (N, C, L) sequence over batch and time."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if site.input_rank != 3:
            return self.skip(f"input {shape_text(site)} is not an (N, C, L) sequence")
        if not policy.over_sequence(site, context):
            return self.skip(f"a {site.flavour} on a rank-3 input, not known to be a sequence (pass --sequence)")
        if site.call_count > 1:
            return self.skip("reported as batchnorm-in-recurrence (NS101)")
        padding = "; padded steps of shorter sequences change the statistics" if context.sequence else ""
        return self.finding(
            site,
            f"'{site.name}' normalizes the sequence {shape_text(site)} with statistics pooled over batch and time steps{padding}.",
            self.natural_remedy(site, context),
        )
