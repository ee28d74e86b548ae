"""NS105 unsynced-distributed: several devices and BatchNorm is not synchronised."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip


class UnsyncedDistributed(Rule):
    """## What it does
    Flags BatchNorm that is not SyncBatchNorm when training runs data-parallel on several devices
    (`--world-size` > 1).

    ## Why is this bad?
    DistributedDataParallel does not synchronise BatchNorm: every device normalizes with the
    statistics of its own shard, so the effective normalization batch is the per-device batch,
    not the global one, and the running statistics of device 0 are the ones saved.

    ## Example
    ```python
    model = DistributedDataParallel(model)   # model holds nn.BatchNorm2d
    ```

    ## Fix safety
    `syncbn` keeps BatchNorm semantics across devices (communication on every layer); GroupNorm
    needs no communication but changes the function (unsafe). normswap proposes GroupNorm /
    LayerNorm; `--to syncbn` is available.

    ## References
    - torch.nn.SyncBatchNorm.convert_sync_batchnorm documentation.
    - Wu & He. Group Normalization. ECCV 2018.
    """

    code = "NS105"
    name = "unsynced-distributed"
    severity = Severity.WARNING
    summary = "Several devices and BatchNorm is not synchronised."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not context.trains or context.world_size <= 1:
            return self.skip("single device or inference only")
        if "SyncBatchNorm" in (site.flavour, site.torch_base):  # timm's SyncBatchNormAct too
            return self.skip("already SyncBatchNorm")
        if not site.batch_dependent_train:
            return self.skip("does not use batch statistics in training")
        return self.finding(
            site,
            f"'{site.name}' normalizes each of {context.world_size} devices with its own shard's statistics.",
            self.natural_remedy(site, context),
        )
