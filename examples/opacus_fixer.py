"""normswap as Opacus' BatchNorm fixer on torchvision's ResNet-18, trained briefly on generated
images: Opacus' own `ModuleValidator.fix`, then the same call with normswap installed (needs
opacus and torchvision: the ecosystem tier's environment). A few minutes on 2 cores.

    python examples/opacus_fixer.py
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from pathlib import Path

import torch
import torchvision
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn

from normswap.integrations import opacus as normswap_opacus

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import accuracy, agreement, shapes_dataset, train


def dp_sgd_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> str:
    """One DP-SGD step in Opacus' hooks mode; what happened, in a few words."""
    model = copy.deepcopy(model).train()
    data = torch.utils.data.TensorDataset(images, labels)
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=torch.utils.data.DataLoader(data, batch_size=32),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    x, y = next(iter(loader))
    try:
        nn.functional.cross_entropy(private(x), y).backward()
        optimizer.step()
    except RuntimeError as error:
        return f"fails: {str(error).splitlines()[0][:75]}..."
    return "runs"


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.basicConfig(format="  log: %(message)s", stream=sys.stdout, force=True)
    logging.getLogger("normswap").setLevel(logging.INFO)  # what normswap's fix did (Opacus' own fixer logs per layer)
    images, labels = shapes_dataset(4000)
    train_x, train_y = images[:2000], labels[:2000]
    public = images[2000:2500]  # stands for public data: calibration is outside DP-SGD's accounting
    held_x, held_y = images[3000:], labels[3000:]
    torch.manual_seed(0)
    original = train(torchvision.models.resnet18(num_classes=4), train_x, train_y, steps=100)
    print(f"ResNet-18 trained on generated images: held-out accuracy {accuracy(original, held_x, held_y):.1%}")

    opacus_fixed = ModuleValidator.fix(original)
    print(
        f"Opacus' fix: agreement with the original {agreement(original, opacus_fixed, held_x):.1%}, "
        f"accuracy {accuracy(opacus_fixed, held_x, held_y):.1%}; a DP-SGD step {dp_sgd_step(opacus_fixed, train_x, train_y)}"
    )

    with normswap_opacus.install():  # no data: each BatchNorm's affine carried over, normswap's group counts
        errors = ModuleValidator.validate(original.train())
        print(f"validate: {len(errors)} errors, the first: {errors[0]}")
        fixed = ModuleValidator.fix(original)
        print(
            f"normswap's fix: agreement with the original {agreement(original, fixed, held_x):.1%}, "
            f"accuracy {accuracy(fixed, held_x, held_y):.1%}; validate after fix: {ModuleValidator.validate(fixed.train())}"
        )
    with normswap_opacus.install(calibration_data=public.split(100), attribution_samples=0):
        fixed = ModuleValidator.fix(original)
        print(
            f"normswap's fix, calibrated: agreement with the original {agreement(original, fixed, held_x):.1%}, "
            f"accuracy {accuracy(fixed, held_x, held_y):.1%}; a DP-SGD step {dp_sgd_step(fixed, train_x, train_y)}"
        )


if __name__ == "__main__":
    main()
