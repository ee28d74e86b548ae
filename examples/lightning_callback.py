"""The NormSwap Lightning callback: fine-tune a trained conv-BN classifier at 4 images per step
with gradient accumulation over 4 steps; the callback converts it before the optimizer exists,
calibrated on separate data, and writes its report through the logger (needs lightning: the
ecosystem tier's environment). A few minutes on 2 cores.

    python examples/lightning_callback.py
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from normswap.integrations.lightning import NormSwap

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import ShapesNet, accuracy, shapes_dataset, train


class Classifier(lightning.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "NormSwap" in record.getMessage()
    )
    images, labels = shapes_dataset(4000)
    torch.manual_seed(0)  # the initial weights
    pretrained = train(ShapesNet(), images[:2000], labels[:2000], steps=300)
    held_x, held_y = images[3000:], labels[3000:]
    print(f"ShapesNet trained with BatchNorm: held-out accuracy {accuracy(pretrained, held_x, held_y):.1%}")

    new_task = torch.utils.data.TensorDataset(images[:2000], labels[:2000])
    shuffle = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(new_task, batch_size=4, shuffle=True, generator=shuffle)  # 4 images per step
    calibration = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[2000:3000]), batch_size=100)
    module = Classifier(pretrained)
    callback = NormSwap(calibration_data=calibration, calibration_batches=4)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=100,
        accumulate_grad_batches=4,
        logger=CSVLogger("normswap-lightning"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader)
    assert callback.conversion is not None
    print(f"the model now: {module.model.bn2}")
    drift = callback.conversion.drift
    print(
        f"agreement with the BatchNorm model before training: swap {drift['swap'].top1_agreement:.1%}, calibrated {drift['calibrated'].top1_agreement:.1%}"
    )
    print(
        f"after {trainer.global_step} optimizer steps of 16 images: held-out accuracy {accuracy(module.model, held_x, held_y):.1%}"
    )
    print(f"report: {Path(trainer.log_dir) / 'normswap' / 'report.md'}")


if __name__ == "__main__":
    main()
