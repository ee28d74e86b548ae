"""NS101 batchnorm-in-recurrence: one BatchNorm applied several times in one forward pass."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Rule, Severity, Skip


class BatchNormInRecurrence(Rule):
    """## What it does
    Flags a BatchNorm module (or functional call) that is applied several times in one forward
    pass, typically once per time step of a recurrent cell.

    ## Why is this bad?
    One set of running statistics is shared by every step, so the statistics mix the
    distributions of early and late steps; in training, each step is normalized by the batch of
    that step only, while the running averages blend all of them, so train and eval diverge.
    Padding and variable-length sequences leak into the statistics. Layer normalization was
    introduced for exactly this case (Ba, Kiros & Hinton, 2016).

    ## Example
    ```python
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(64)
        def forward(self, xs):
            h = xs[0]
            for x in xs:            # self.bn runs at every step
                h = torch.tanh(self.bn(self.ih(x) + self.hh(h)))
            return h
    ```

    A BatchNorm shared by several branches over feature maps (siamese or multi-scale heads) has
    the same problem; there the proposed replacement is GroupNorm.

    Ghost batch norm (TabNet's GBN: `x.chunk(n)` of the batch axis, one BatchNorm per chunk,
    `torch.cat`) is not recurrence: the calls normalize chunks of one step's batch, each by its
    own statistics, and the running statistics are shared across those chunks by design. The
    finding says so; the replacement is the one for a single call on a chunk, and the chunk size
    is what small-batch (NS103) judges.

    ## Fix safety
    Unsafe: LayerNorm normalizes each sample and step on its own, which changes the function;
    calibrate and heal a trained checkpoint (`normswap convert --calibration-data`).

    ## References
    - Ba, Kiros, Hinton. Layer Normalization. arXiv:1607.06450, 2016.
    - Cooijmans et al. Recurrent Batch Normalization. ICLR 2017 (why per-step statistics are needed).
    """

    code = "NS101"
    name = "batchnorm-in-recurrence"
    severity = Severity.WARNING
    summary = "One BatchNorm is applied several times in one forward pass."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if site.call_count < 2:
            return self.skip("called once per forward")
        if site.ghost_batch:
            return self.finding(
                site,
                f"'{site.name}' normalizes the batch in {len(site.chunk_sizes)} chunks of "
                f"{', '.join(dict.fromkeys(str(n) for n in site.chunk_sizes))} sample(s) (ghost batch norm): "
                "each chunk by its own statistics, with the running statistics shared across the chunks of one step, "
                "not across time steps.",
                self.natural_remedy(site, context),
            )
        # per-step reuse gets LayerNorm; one BN shared by branches over feature maps (siamese,
        # multi-scale) GroupNorm, which normalizes each call's map on its own
        return self.finding(
            site,
            f"'{site.name}' is applied {site.call_count} times per forward pass: its statistics pool every call.",
            self.natural_remedy(site, context),
        )
