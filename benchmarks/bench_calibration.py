"""Calibration and healing evidence: top-1 agreement with the original and accuracy on held-out
generated data for the plain swap, calibrated and healed models."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import torch

import normswap
from synthetic import SequenceRNN, ShapesNet, accuracy, agreement, sequence_dataset, shapes_dataset, train

CASES = [
    # name, model, dataset, training steps / lr, convert kwargs, heal lr
    ("shapes conv-BN, GroupNorm(<=4 groups)", lambda: ShapesNet(16), shapes_dataset, (300, 3e-3), {"to": "groupnorm", "max_groups": 4}, 3e-3),
    ("shapes conv-BN, GroupNorm(<=32 groups)", lambda: ShapesNet(16), shapes_dataset, (300, 3e-3), {"to": "groupnorm"}, 3e-3),
    ("shapes conv-BN, LayerNorm", lambda: ShapesNet(16), shapes_dataset, (300, 3e-3), {"to": "layernorm"}, 3e-3),
    ("sequence RNN, BN reused x12 -> LayerNorm", SequenceRNN, sequence_dataset, (1000, 5e-3), {"to": "auto"}, 1e-2),
]


def main() -> None:
    print(f"{'model':<42} {'stage':<11} {'agreement':>9} {'accuracy':>9}")
    for name, build, dataset, (steps, lr), kwargs, heal_lr in CASES:
        x, y = dataset(3000, seed=0)
        xt, yt = dataset(1000, seed=1)  # held out: never seen by training, calibration or healing
        torch.manual_seed(0)  # reproducible initialization
        model = train(build(), x, y, steps=steps, lr=lr)
        batches = [x[i : i + 64] for i in range(0, 1024, 64)]
        start = time.perf_counter()
        stages = {
            "original": model,
            "swap": normswap.convert(model, x[:8], **kwargs).model,
            "calibrated": normswap.convert(model, x[:8], calibration_data=batches, **kwargs).model,
            "healed": normswap.convert(model, x[:8], calibration_data=batches, heal=normswap.HealOptions(steps=300, lr=heal_lr), **kwargs).model,
        }
        elapsed = time.perf_counter() - start
        for stage, m in stages.items():
            print(f"{name:<42} {stage:<11} {agreement(m, model, xt):9.1%} {accuracy(m, xt, yt):9.1%}")
        print(f"{'':<42} (convert x3 incl. calibration and 300 heal steps: {elapsed:.1f} s)")


if __name__ == "__main__":
    main()
