"""NS203 degenerate-groups: the natural GroupNorm would normalize single values."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from ..targets import DEFAULT_MAX_GROUPS
from .base import Finding, Fix, Rule, Severity, Skip, shape_text


class DegenerateGroups(Rule):
    """## What it does
    Flags sites where the textbook replacement, `GroupNorm(min(32, C), C)`, would put a single
    value in a group: (N, C) features with C <= 32, or (N, C, 1, 1) maps after global pooling.

    ## Why is this bad?
    A group of one value has zero variance: `(x - mean) / sqrt(var + eps)` is exactly 0 for every
    input, so the layer outputs only its bias and the network silently stops learning through it.
    Tools that apply GroupNorm(32) everywhere produce such layers.

    ## Example
    ```python
    nn.BatchNorm1d(16)   # on (N, 16): GroupNorm(16, 16) outputs the bias only
    ```

    ## Fix safety
    Unsafe like any swap. normswap never plans a degenerate group: it uses LayerNorm for (N, C)
    features and fewer groups elsewhere.

    ## References
    - Wu & He. Group Normalization. ECCV 2018, section 3.1 (G = C is InstanceNorm, which needs spatial extent).
    """

    code = "NS203"
    name = "degenerate-groups"
    severity = Severity.WARNING
    summary = "The natural GroupNorm replacement would normalize single values."
    fix_safe = False

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not site.batch_dependent or site.num_features is None or site.spatial_size is None:
            return self.skip("no batch-dependent site with a known shape")
        channels = site.num_features
        groups = min(DEFAULT_MAX_GROUPS, channels)
        if channels % groups or (channels // groups) * site.spatial_size >= 2:
            return self.skip(f"GroupNorm({groups}, {channels}) keeps several values per group")
        target = "layernorm" if site.input_rank == 2 or channels < 2 else "groupnorm"
        return self.finding(
            site,
            f"GroupNorm({groups}, {channels}) on '{site.name}' input {shape_text(site)} would normalize single values to zero.",
            Fix(target, False, f"use {target} with several values per group (normswap chooses it)"),
        )
