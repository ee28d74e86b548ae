"""What calibration costs: its time divided by one forward pass of the original over the same
data, and the activations it holds, on the ResNet-50 layout (53 sites), a chain of 3x3
convolutions as deep (53 sites) and 10x as deep (530 sites), and a chain of 530 layers whose 1x1
convolutions on 8 channels cost less than a site's statistics (the worst case); lockstep (now)
against layer by layer from the input (before: time grows with sites x depth).

    python benchmarks/bench_calibration.py            # both methods (layer by layer takes minutes)
    python benchmarks/bench_calibration.py --now-only # lockstep only

One CPU thread, 4 unlabeled batches of 16 (--batches N), groupnorm, no attribution; times are medians of 3 runs
(1 for layer by layer, which is not run on the 530-site chains: hours).
"""

from __future__ import annotations

import argparse
import copy
import gc
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import normswap
from nets import ConvChain, DeepChain, ResNet50, trained_statistics
from normswap.calibration.fit import calibrate_sites

# name, model, batch shape, layer by layer measured
CASES: list[tuple[str, Callable[[], torch.nn.Module], tuple[int, ...], bool]] = [
    ("ResNet-50 layout, 53 sites, 64x64", lambda: ResNet50(), (16, 3, 64, 64), True),
    ("3x3 conv chain, 53 sites, 32ch 16x16", lambda: ConvChain(53), (16, 32, 16, 16), True),
    ("3x3 conv chain, 530 sites, 32ch 16x16", lambda: ConvChain(530), (16, 32, 16, 16), False),
    ("1x1 conv chain, 530 sites, 8ch x 2048", lambda: DeepChain(530), (16, 8, 2048), False),
]
BATCHES = 4


def _seconds(run: Callable[[Any], object], repeats: int, prepare: Callable[[], Any] = lambda: None) -> float:
    """Median wall time of `run(prepare())` over `repeats` runs, `prepare` untimed."""
    times = []
    for _ in range(repeats):
        prepared = prepare()
        gc.collect()  # the previous run's garbage is not this run's time
        start = time.perf_counter()
        run(prepared)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _forward(original: torch.nn.Module, data: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in data:
            original(batch)


def _measure(
    name: str,
    build: Callable[[], torch.nn.Module],
    shape: tuple[int, ...],
    batches: int,
    methods: list[tuple[str, bool, int]],
) -> None:
    torch.manual_seed(0)
    original = trained_statistics(build(), shape)
    data = [torch.randn(shape) for _ in range(batches)]
    conversion = normswap.convert(original, data[0], to="groupnorm")
    one_pass = _seconds(lambda _: _forward(original, data), 3)
    for method, layer_by_layer, repeats in methods:
        held: list[int] = []

        def calibrate(model: torch.nn.Module, layer_by_layer: bool = layer_by_layer, held: list[int] = held) -> None:
            held.append(
                calibrate_sites(
                    model, original, data, conversion.plan, device="cpu", layer_by_layer=layer_by_layer
                ).held_bytes
            )

        seconds = _seconds(calibrate, repeats, lambda: copy.deepcopy(conversion.model))  # the copy is not timed
        memory = "one forward" if layer_by_layer else f"{max(held) / 2**20:.0f} MiB"
        print(
            f"{name:<42} {method:<15} {one_pass:7.2f}s {seconds:10.2f}s {seconds / one_pass:6.1f}x {memory:>17}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--now-only", action="store_true", help="skip the layer-by-layer method (minutes)")
    parser.add_argument("--batches", type=int, default=BATCHES, help=f"calibration batches of 16 (default {BATCHES})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':<42} {'method':<15} {'forward':>8} {'calibration':>11} {'ratio':>7} {'held activations':>17}")
    for name, build, shape, before in CASES:
        methods = [("lockstep (now)", False, 3)] + (
            [("layer by layer", True, 1)] if before and not args.now_only else []
        )
        _measure(name, build, shape, args.batches, methods)
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
