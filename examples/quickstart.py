"""Quickstart: train a small conv-BN classifier on generated data, then `normswap convert` it.

    python examples/quickstart.py [--out DIR]

Writes DIR/checkpoint.pt and DIR/calibration.pt, then runs
`normswap convert DIR/checkpoint.pt --model examples/synthetic.py:ShapesNet ... --out DIR/converted`
with calibration and half a minute of healing, and prints the report. No network, about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from synthetic import ShapesNet, accuracy, shapes_dataset, train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="normswap-quickstart", help="working directory (default: ./normswap-quickstart)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    images, labels = shapes_dataset(3000, seed=0)
    held_out, held_out_labels = shapes_dataset(1000, seed=1)
    torch.manual_seed(0)
    model = train(ShapesNet(width=16), images, labels, steps=300)
    print(f"trained ShapesNet on generated images: held-out accuracy {accuracy(model, held_out, held_out_labels):.1%}")
    torch.save(model.state_dict(), out / "checkpoint.pt")
    torch.save(images[:1024].clone(), out / "calibration.pt")  # unlabeled inputs

    from normswap.cli import main as normswap

    command = [
        "convert",
        str(out / "checkpoint.pt"),
        "--model",
        f"{HERE / 'synthetic.py'}:ShapesNet",
        "--input-shape",
        "8,3,16,16",
        "--out",
        str(out / "converted"),
        "--force",
        "--calibration-data",
        str(out / "calibration.pt"),
        "--heal-budget",  # healing's defaults run until held-out agreement stops improving: minutes here
        "0.5",
    ]
    print("$ normswap " + " ".join(command))
    try:
        normswap(command, prog_name="normswap")
    except SystemExit as exit_:
        if exit_.code:
            return int(exit_.code)

    import normswap as ns

    converted = ns.load_converted(ShapesNet(width=16), out / "converted")
    print(
        f"converted model reloaded with normswap.load_converted: held-out accuracy {accuracy(converted, held_out, held_out_labels):.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
