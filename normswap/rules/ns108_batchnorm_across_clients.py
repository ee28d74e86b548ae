"""NS108 batchnorm-across-clients: BatchNorm in a model trained by federated clients."""

from __future__ import annotations

from ..context import Context
from ..sites import Site
from .base import Finding, FixSafety, Remedy, Rule, Severity, Skip


class BatchNormAcrossClients(Rule):
    """## What it does
    Flags BatchNorm that normalizes with batch statistics in training when the model is trained
    by federated clients (`--federated`).

    ## Why is this bad?
    Each client normalizes with the statistics of its own data. When the clients' data differ
    (non-IID: other hospitals' scanners, other users' cameras), the running statistics and the
    affine a client fits describe its own features, and their average describes no client's:
    Hsieh et al. measure BatchNorm failing under skewed partitions where GroupNorm, which keeps
    no statistics, recovers most of the accuracy. FedAvg implementations also disagree on what
    they average. Most average `model.parameters()`: the running statistics are buffers, so
    each client keeps its own and the global model keeps those of the client it was copied from
    (TsingZ0/PFLlib#260). Others average the whole state dict, mixing the statistics of
    different distributions. FedBN (Li et al.) keeps every BatchNorm parameter and statistic on
    its client and averages the rest; Flower's FedBN recipe selects them with `"bn" not in key`,
    which misses every BatchNorm whose name has no "bn" (torchvision's `layer2.0.downsample.1`,
    MobileNet's `features.0.1`).

    ## Example
    ```python
    # the server's FedAvg step: parameters only, so running_mean / running_var stay per client
    for server, client in zip(global_model.parameters(), client_model.parameters()):
        server.data += weight * client.data
    ```

    ## Fix safety
    Unsafe: GroupNorm (LayerNorm for (N, C) features) changes the function, and leaves nothing
    client-specific to average. To keep BatchNorm, keep it on each client (FedBN):
    `normswap.federated.local_state(model, example_inputs).names` are the state-dict keys of
    every BatchNorm's parameters and statistics, found in the graph rather than by name.

    ## References
    - Li, Jiang, Zhang, Kamp, Dou. FedBN: Federated Learning on Non-IID Features via Local
      Batch Normalization. ICLR 2021.
    - Hsieh, Phanishayee, Mutlu, Gibbons. The Non-IID Data Quagmire of Decentralized Machine
      Learning. ICML 2020.
    - TsingZ0/PFLlib#260, KarhouTam/FL-bench#72: BatchNorm buffers in FedAvg.
    """

    code = "NS108"
    name = "batchnorm-across-clients"
    severity = Severity.WARNING
    summary = "BatchNorm statistics differ per federated client; FedAvg averages or strands them."
    fix_safety = FixSafety.UNSAFE

    def check(self, site: Site, context: Context) -> Finding | Skip:
        if not context.federated or not context.trains:
            return self.skip("not trained by federated clients")
        if not site.batch_dependent_train:
            return self.skip("does not use batch statistics in training")
        remedy = self.natural_remedy(site, context)
        return self.finding(
            site,
            f"'{site.name}' normalizes with each client's own batch statistics: FedAvg averages its affine across "
            "clients whose features differ, and its running statistics only where it averages buffers (over "
            "parameters() each client keeps its own); replace it, or keep it on each client (FedBN: "
            "normswap.federated.local_state names its state).",
            Remedy(remedy.target, remedy.safe, f"{remedy.description}; or FedBN: keep its state on each client"),
        )
