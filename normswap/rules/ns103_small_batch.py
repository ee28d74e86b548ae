"""NS103 small-batch: per-device training batch below the threshold."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip, accumulated_batch


class SmallBatch(Rule):
    """## What it does
    Flags every batch-dependent BatchNorm when the per-device training batch (`--batch-size`,
    `batch_size` in `[tool.normswap]`) is below the threshold (16 by default). With gradient
    accumulation (`--accumulate N`) it judges the micro-batch one forward pass sees, which is what
    BatchNorm normalizes, not the optimizer's batch of N micro-batches.

    ## Why is this bad?
    Batch statistics of a few samples are noisy estimates; the error grows quickly as the batch
    shrinks. Wu & He report ResNet-50 on ImageNet at 2 images per GPU: 34.7% top-1 error with
    BatchNorm against 24.1% with GroupNorm, whose error does not depend on the batch size.
    Detection, segmentation, video and 3D models usually train this way. Gradient accumulation
    restores the optimizer's batch but not BatchNorm's: each micro-batch is still normalized with
    its own statistics.

    ## Example
    ```toml
    [tool.normswap]
    batch_size = 2
    ```
    or `--batch-size 4 --accumulate 8`: the optimizer sees 32 samples per step, BatchNorm 4.

    ## Fix safety
    Unsafe: GroupNorm (feature maps) or LayerNorm (features) change the function. For fine-tuning
    a pretrained model, freeze instead (NS302), which keeps it.

    ## References
    - Wu & He. Group Normalization. ECCV 2018, Figure 1 and Table 2.
    - Ioffe. Batch Renormalization. NeurIPS 2017.
    - pytorch/pytorch#46516 and Lightning-AI/pytorch-lightning#17446: BatchNorm under gradient accumulation.
    """

    code = "NS103"
    name = "small-batch"
    severity = Severity.WARNING
    summary = "Per-device training batch is below the small-batch threshold."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not context.trains:
            return self.skip("inference only: no batch statistics are used")
        if context.batch_size is None:
            return self.skip("batch size unknown (pass --batch-size)")
        # ghost batch norm: each call sees one chunk of the batch (at most the chunk the example made)
        per_call = min(context.batch_size, max(site.chunk_sizes)) if site.ghost_batch else context.batch_size
        if per_call >= context.small_batch_threshold:
            return self.skip(f"batch size {per_call} >= {context.small_batch_threshold}")
        if not site.batch_dependent_train:
            return self.skip("does not use batch statistics in training")
        if site.ghost_batch:
            return self.finding(
                site,
                f"'{site.name}' estimates its statistics from chunks of {per_call} sample(s), one call per chunk "
                f"of the batch (ghost batch norm; {context.batch_size} sample(s) per device, "
                f"threshold {context.small_batch_threshold}); they will be noisy.",
                self.natural_remedy(site, context),
            )
        rows = site.rows_per_sample or 1
        flattened = (
            f", {context.batch_size * rows} rows of {rows} per sample, which are steps of the same samples"
            if rows > 1
            else ""
        )
        accumulated = accumulated_batch(context)
        samples = f"micro-batches of {context.batch_size}" if accumulated else str(context.batch_size)
        return self.finding(
            site,
            f"'{site.name}' estimates its statistics from {samples} sample(s) per device{flattened} "
            f"(threshold {context.small_batch_threshold}); {f'{accumulated}, so ' if accumulated else ''}they will be noisy.",
            self.natural_remedy(site, context),
        )
