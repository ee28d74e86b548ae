"""NS203 degenerate-groups: the natural GroupNorm would normalize single values."""

from __future__ import annotations

from .. import policy
from ..context import Context
from ..errors import PlanError
from ..sites import Site
from ..targets import DEFAULT_MAX_GROUPS
from ..targets.groupnorm import choose_num_groups
from .base import Finding, FixSafety, Rule, Severity, Skip, shape_text


class DegenerateGroups(Rule):
    """## What it does
    Where the replacement normswap uses is GroupNorm, flags sites where the textbook
    `GroupNorm(min(32, C), C)` would put a single value in a group: (N, C, 1, 1) maps after
    global pooling, or narrow maps of few positions. It says which grouping normswap uses instead.
    Sites whose replacement is LayerNorm or a frozen BatchNorm have no groups and are not flagged.

    ## Why is this bad?
    A group of one value has zero variance: `(x - mean) / sqrt(var + eps)` is exactly 0 for every
    input, so the layer outputs only its bias and the network silently stops learning through it.
    Tools that apply GroupNorm(32) everywhere produce such layers.

    ## Example
    ```python
    nn.BatchNorm2d(16)   # on (N, 16, 1, 1): GroupNorm(16, 16) outputs the bias only
    ```

    ## Fix safety
    Unsafe like any swap. normswap never plans a degenerate group: its grouping keeps at least
    16 channels per group (`--channels-per-group`) and more than one value in every group.

    ## References
    - Wu & He. Group Normalization. ECCV 2018, section 3.1 (G = C is InstanceNorm, which needs spatial extent).
    """

    code = "NS203"
    name = "degenerate-groups"
    severity = Severity.WARNING
    summary = "The textbook GroupNorm(32) replacement would normalize single values."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if site.num_features is None or site.spatial_size is None:
            return self.skip("input shape unknown")
        target, _ = policy.natural_target(site, context)
        if target != "groupnorm":
            return self.skip(f"the replacement used here is {target}, which has no groups")
        channels = site.num_features
        textbook = min(DEFAULT_MAX_GROUPS, channels)
        if channels % textbook or (channels // textbook) * site.spatial_size >= 2:
            return self.skip(f"GroupNorm({textbook}, {channels}) keeps several values per group")
        remedy = self.natural_remedy(site, context)
        try:
            groups, _ = choose_num_groups(channels, site.spatial_size)
        except PlanError:
            return self.finding(
                site,
                f"'{site.name}' input {shape_text(site)} has a single value per sample: any GroupNorm would normalize it to zero.",
                remedy,
            )
        return self.finding(
            site,
            f"GroupNorm({textbook}, {channels}) on '{site.name}' input {shape_text(site)} would normalize single values to zero; "
            f"normswap uses GroupNorm({groups}, {channels}).",
            remedy,
        )
