"""NS104 batch-of-one: training with one sample where BatchNorm needs more than one value per channel."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip, accumulated_batch, shape_text


class BatchOfOne(Rule):
    """## What it does
    Flags BatchNorm over (N, C) features (one value per channel and sample) when training uses a
    batch of one per device; with gradient accumulation (`--accumulate N`), a micro-batch of one,
    whatever the optimizer's batch.

    ## Why is this bad?
    With one value per channel the batch variance is undefined; PyTorch raises
    `ValueError: Expected more than 1 value per channel when training` at run time — often only
    on the last, smaller batch of an epoch.

    ## Example
    ```python
    head = nn.Sequential(nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU())
    # batch_size = 1  ->  ValueError in model.train()
    ```

    ## Fix safety
    Unsafe: LayerNorm / GroupNorm normalize per sample and change the function.

    ## References
    - PyTorch source, torch.nn.functional._verify_batch_size.
    """

    code = "NS104"
    name = "batch-of-one"
    severity = Severity.ERROR
    summary = "Training batch of one where BatchNorm needs more than one value per channel."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not context.trains or context.batch_size != 1:
            return self.skip("training batch size is not 1")
        if not site.batch_dependent_train:
            return self.skip("does not use batch statistics in training")
        if site.spatial_size is None or site.spatial_size > 1:
            return self.skip(f"input {shape_text(site)} has several values per channel")
        rows = site.rows_per_sample or 1
        if rows > 1:
            return self.skip(
                f"input {shape_text(site)} holds {rows} rows per sample of the model's batch (dim 0 is not the batch, "
                f"e.g. a flattened sequence): a batch of one still gives {rows} values per channel"
            )
        accumulated = accumulated_batch(context)
        return self.finding(
            site,
            f"'{site.name}' sees one value per channel at {'a micro-batch of' if accumulated else 'batch size'} 1 "
            f"(input {shape_text(site)}): training raises ValueError{f'; {accumulated}' if accumulated else ''}.",
            self.natural_remedy(site, context),
        )
