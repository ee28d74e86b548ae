"""NS302 freeze-for-finetune: small-batch fine-tuning of a pretrained model: freeze BatchNorm."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Remedy, Rule, Severity, Skip


class FreezeForFinetune(Rule):
    """## What it does
    When a pretrained model is fine-tuned with small per-device batches, proposes freezing each
    BatchNorm (running statistics and affine fixed) instead of swapping it.

    ## Why is this bad?
    Fine-tuning with small batches replaces good pretrained statistics with noisy ones, and a
    swap to GroupNorm would throw the pretrained normalization away. Detection frameworks
    (Detectron2, torchvision detection) freeze the backbone's BatchNorm for this reason.

    ## Example
    ```toml
    [tool.normswap]
    finetune = true
    batch_size = 2
    ```

    ## Fix safety
    Safe: FrozenBatchNorm computes BatchNorm's eval-mode function exactly.

    ## References
    - He, Gkioxari, Dollár, Girshick. Mask R-CNN. ICCV 2017 (frozen BN in the backbone).
    - Wu & He. Group Normalization. ECCV 2018, section 5.
    """

    code = "NS302"
    name = "freeze-for-finetune"
    severity = Severity.INFO
    summary = "Small-batch fine-tuning of a pretrained model: freeze, function kept."
    fix_safety = FixSafety.SAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not (context.finetune and context.trains):
            return self.skip("not fine-tuning")
        if context.batch_size is not None and context.batch_size >= context.small_batch_threshold:
            return self.skip(f"batch size {context.batch_size} is not small")
        if not site.track_running_stats or site.batch_dependent_eval:
            return self.skip("no running statistics to freeze")
        return self.finding(
            site,
            f"'{site.name}' has pretrained running statistics: freeze it for small-batch fine-tuning.",
            Remedy("frozen", True, "freeze: BatchNorm's eval function, exactly"),
        )
