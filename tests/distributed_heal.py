"""Run under torchrun by test_calibrate.py: heal data-parallel and save each rank's result."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import normswap
from synthetic import ShapesNet, shapes_dataset

torch.manual_seed(0)
x, _ = shapes_dataset(512, seed=0)
model = ShapesNet(width=8)
with torch.no_grad():
    model.train()(x[:256])  # running statistics
model.eval()
converted = normswap.convert(model, x[:8], to="groupnorm", max_groups=4).model
result = normswap.heal(converted, model, [x[i : i + 64] for i in range(0, 512, 64)], steps=20, lr=3e-3, progress=False)
rank = int(os.environ["RANK"])
torch.save(
    {
        "state": converted.state_dict(),
        "best": result.best_heldout_loss,
        "initial": result.initial_heldout_loss,
        "world_size": torch.distributed.get_world_size(),
    },
    Path(os.environ["NORMSWAP_TEST_OUT"]) / f"rank{rank}.pt",
)
torch.distributed.destroy_process_group()
