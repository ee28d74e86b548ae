"""NS204 momentum-as-decay: a BatchNorm momentum that reads as a TensorFlow decay (> 0.5)."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip, SourceFix

THRESHOLD = 0.5


class MomentumAsDecay(Rule):
    """## What it does
    Flags a BatchNorm whose `momentum` is above 0.5, the usual sign of a value ported from
    TensorFlow / Keras, where the same number means the opposite.

    ## Why is this bad?
    In TensorFlow `momentum` (or `decay`) is the weight of the *old* running average:
    `running = decay * running + (1 - decay) * batch`. In PyTorch it is the weight of the *new*
    batch: `running = (1 - momentum) * running + momentum * batch`. A ported 0.997 therefore keeps
    only 0.3% of the history: the running statistics are almost entirely the last batch's, so
    evaluation after training normalizes with one batch's noise. transformers' MobileNetV2 builds
    `nn.BatchNorm2d(..., momentum=0.997)` and its EfficientNet config defaults to
    `batch_norm_momentum=0.99`.

    ## Example
    ```python
    nn.BatchNorm2d(32, eps=1e-3, momentum=0.997)   # meant: momentum=1 - 0.997 = 0.003
    ```

    ## Fix safety
    No automatic fix: the value is an argument of your code (`momentum=1 - decay`). It changes how
    the running statistics are updated in training, not the eval-mode function of a trained model.

    ## References
    - PyTorch documentation, BatchNorm2d: "momentum ... the value used for the running_mean and running_var computation".
    - TensorFlow documentation, tf.keras.layers.BatchNormalization: "momentum: Momentum for the moving average".
    """

    code = "NS204"
    name = "momentum-as-decay"
    severity = Severity.WARNING
    summary = "A BatchNorm momentum above 0.5 reads as a TensorFlow decay: torch's momentum is 1 - decay."
    fix_safety = FixSafety.NONE
    source_fix = SourceFix.NEVER  # no fix

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not context.trains:
            return self.skip("inference only: running statistics are not updated")
        if not site.track_running_stats or site.momentum is None:
            return self.skip("no exponential running average")
        if site.momentum <= THRESHOLD:
            return self.skip(f"momentum {site.momentum:g} <= {THRESHOLD}")
        return self.finding(
            site,
            f"'{site.name}' has momentum {site.momentum:g}: in torch that is the weight of each new batch, so its running statistics are "
            f"{site.momentum:.1%} the last batch's; a TensorFlow decay of {site.momentum:g} is torch momentum {1 - site.momentum:.3g}.",
        )
