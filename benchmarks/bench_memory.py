"""Peak memory of convert, step by step, relative to the parameter size and one forward's activations.

RSS is sampled every 2 ms from /proc/self/statm by a background thread (torch allocations are not
visible to tracemalloc).
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import normswap
from nets import ResNet50, trained_statistics

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 2**20


class PeakSampler:
    def __init__(self) -> None:
        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def main() -> dict:
    model = trained_statistics(ResNet50(), (4, 3, 224, 224))
    x = torch.randn(2, 3, 224, 224)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with tempfile.TemporaryDirectory() as folder:
        normswap.export_onnx(model, x, Path(folder) / "warm.onnx")  # imports and caches first
        gc.collect()
        base = rss_mib()
        with PeakSampler() as forward, torch.no_grad():
            model(x)
        activations = forward.peak - base
        gc.collect()
        steps = {}
        start = rss_mib()
        with PeakSampler() as peak:
            conversion = normswap.convert(model, x)
        steps["convert (copy, trace, rewrite)"] = peak.peak
        with PeakSampler() as peak:
            path = normswap.export_onnx(conversion.model, x, Path(folder) / "model.onnx")
            gc.collect()
        steps["export_onnx"] = peak.peak
        with PeakSampler() as peak:  # as convert runs it: validate opens its own session, after the PyTorch side
            normswap.validate_onnx(conversion.model, path, x, original=model, plan=conversion.plan)
        steps["validate (with its session)"] = peak.peak
    overall = max(steps.values()) - start
    print(
        f"peak memory, ResNet-50 layout, input 2x3x224x224: parameters {params:.0f} MiB, one eval forward's activations {activations:.0f} MiB"
    )
    for name, value in steps.items():
        print(f"  {name:<32} peak RSS {value - start:7.0f} MiB above the start of convert")
    print(
        f"  overall growth {overall:.0f} MiB = {(overall - activations) / params:.1f}x parameters + one forward's activations (target < 3x)"
    )
    return {"growth_over_params": (overall - activations) / params}


if __name__ == "__main__":
    main()
