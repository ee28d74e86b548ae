"""Calibration and healing: top-1 agreement with the original and accuracy on held-out generated
data (3,000 samples, never seen by training, calibration or healing) for the swap alone, the
calibrated and the healed model with the default HealOptions(); mean over three trained seeds.
Also the GroupNorm grouping policy: one channel per group (the old default), 4 and 16 (the new
default) channels per group."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import torch

import normswap
from synthetic import (
    SequenceRNN,
    ShapesNet,
    TabularMLP,
    accuracy,
    agreement,
    sequence_dataset,
    shapes_dataset,
    tabular_dataset,
    train,
)

SEEDS = (0, 1, 2)
CASES = [
    # name, model, dataset, (training steps, lr), convert kwargs
    (
        "shapes conv-BN -> auto (GroupNorm, 16 ch/group)",
        lambda: ShapesNet(16),
        shapes_dataset,
        (300, 3e-3),
        {"to": "auto"},
    ),
    (
        "shapes conv-BN -> GroupNorm, 4 ch/group",
        lambda: ShapesNet(16),
        shapes_dataset,
        (300, 3e-3),
        {"to": "groupnorm", "channels_per_group": 4},
    ),
    (
        "shapes conv-BN -> GroupNorm, <=32 groups (old)",
        lambda: ShapesNet(16),
        shapes_dataset,
        (300, 3e-3),
        {"to": "groupnorm", "channels_per_group": 1},
    ),
    ("shapes conv-BN -> LayerNorm", lambda: ShapesNet(16), shapes_dataset, (300, 3e-3), {"to": "layernorm"}),
    ("sequence RNN, BN reused x12 -> auto (LayerNorm)", SequenceRNN, sequence_dataset, (1000, 5e-3), {"to": "auto"}),
    (
        "tabular MLP, input BN only -> auto (frozen)",
        lambda: TabularMLP(hidden_norm=False),
        tabular_dataset,
        (1500, 3e-3),
        {"to": "auto"},
    ),
    ("tabular MLP, input + hidden BN -> auto", TabularMLP, tabular_dataset, (1500, 3e-3), {"to": "auto"}),
]
STAGES = ("original", "swap", "calibrated", "healed")


def run_case(build, dataset, steps: int, lr: float, kwargs: dict, seed: int) -> dict[str, tuple[float, float]]:
    x, y = dataset(3000, seed=0)
    xt, yt = dataset(3000, seed=1)  # held out
    torch.manual_seed(seed)
    model = train(build(), x, y, steps=steps, lr=lr, seed=seed)
    batches = [x[i : i + 64] for i in range(0, 1024, 64)]  # 1,024 unlabeled training inputs
    models = {
        "original": model,
        "swap": normswap.convert(model, x[:8], **kwargs).model,
        "calibrated": normswap.convert(model, x[:8], calibration_data=batches, **kwargs).model,
        "healed": normswap.convert(model, x[:8], calibration_data=batches, heal=normswap.HealOptions(), **kwargs).model,
    }
    return {stage: (agreement(m, model, xt), accuracy(m, xt, yt)) for stage, m in models.items()}


def main(only: str = "") -> dict:
    results = {}
    print(f"{'model':<50} {'stage':<11} {'agreement':>9} {'accuracy':>9} {'vs original':>11}   (mean of seeds {SEEDS})")
    for name, build, dataset, (steps, lr), kwargs in CASES:
        if only not in name:
            continue
        start = time.perf_counter()
        runs = [run_case(build, dataset, steps, lr, kwargs, seed) for seed in SEEDS]
        results[name] = runs
        original = statistics.mean(run["original"][1] for run in runs)
        for stage in STAGES:
            agree = statistics.mean(run[stage][0] for run in runs)
            acc = statistics.mean(run[stage][1] for run in runs)
            worst = min(run[stage][1] - run["original"][1] for run in runs)
            print(
                f"{name:<50} {stage:<11} {agree:9.1%} {acc:9.1%} {(acc - original) * 100:+10.1f}pt   worst seed {worst * 100:+.1f}pt"
            )
        print(f"{'':<50} ({time.perf_counter() - start:.0f} s for {len(SEEDS)} seeds)", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")  # optional: only the cases whose name contains it
