"""Heal data-parallel (under torchrun, from test_calibrate.py) or in one process (imported), on a
DataLoader over a map-style dataset, and report what each process did."""

import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import normswap
from seeds import SEED, data_seeds
from synthetic import ShapesNet, shapes_dataset

IMAGES = 1280  # training images seen in all: 40 steps of 32 in one process, 20 of 2 x 32 in two


class Recorded(Dataset):
    """The shapes images, recording which ones this process read."""

    def __init__(self) -> None:
        self.x, _ = shapes_dataset(640, seed=data_seeds()[0])
        self.read: set[int] = set()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.read.add(index)
        return self.x[index]


def setup() -> tuple[torch.nn.Module, torch.nn.Module, Recorded]:
    torch.manual_seed(SEED)
    data = Recorded()
    model = ShapesNet(width=8)
    with torch.no_grad():
        model.train()(data.x[:256])  # running statistics
    model.eval()
    converted = normswap.convert(model, data.x[:8], to="groupnorm", max_groups=4).model
    return model, converted, data


def heal(world: int) -> tuple[normswap.HealResult, torch.nn.Module, Recorded]:
    model, converted, data = setup()
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    steps = IMAGES // (32 * world)
    result = normswap.heal(converted, model, loader, steps=steps, eval_every=steps // 4, progress=False)
    return result, converted, data


def lowest_loss(result: normswap.HealResult) -> float:
    """The lowest held-out distillation loss healing reached (the model kept is chosen by
    agreement, which on this small untrained net moves in steps of 1/128)."""
    return min(point.score.loss for point in result.curve)


if __name__ == "__main__":
    result, converted, data = heal(int(os.environ["WORLD_SIZE"]))
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "state": converted.state_dict(),
            "best": lowest_loss(result),
            "initial": result.initial.loss,
            "images": result.images,
            "read": sorted(data.read),
            "world_size": torch.distributed.get_world_size(),
        },
        Path(os.environ["NORMSWAP_TEST_OUT"]) / f"rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()
