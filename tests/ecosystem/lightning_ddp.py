"""A two-process DDP fit on CPU (gloo) with the NormSwap callback, run as a script by
test_lightning_callback.py: Lightning's DDP launcher starts the second process by running this
file again. Rank 0 writes what it saw to the JSON file named on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normswap.integrations.lightning import NormSwap


class Net(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: Path) -> None:
    lightning.seed_everything(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,)))
    callback = NormSwap()
    module = Net()
    trainer = lightning.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        sync_batchnorm=True,
        accumulate_grad_batches=2,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    before = module.conv.weight.detach().clone()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    if trainer.is_global_zero:
        assert callback.context is not None and callback.conversion is not None
        out.write_text(
            json.dumps(
                {
                    "world_size": callback.context.world_size,
                    "batch_size": callback.context.batch_size,
                    "accumulation": callback.context.accumulation,
                    "plan": callback.conversion.plan.counts(),
                    "norm": type(module.bn).__name__,
                    "batchnorm_left": any(isinstance(m, _BatchNorm) for m in module.modules()),
                    "global_step": trainer.global_step,
                    "trained": not torch.equal(before, module.conv.weight.detach()),
                }
            )
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
