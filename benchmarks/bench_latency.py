"""onnxruntime latency (CPU, 2 threads, median of repeated runs): BatchNorm original vs converted."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
import normswap
from nets import MobileNetV2, ResNet50, trained_statistics


def latency(path: Path, batch: int, repeats: int = 15) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {
        session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    }
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(repeats: int = 15) -> dict:
    results = {}
    x = torch.randn(2, 3, 224, 224)
    with tempfile.TemporaryDirectory() as folder:
        for name, build in (("resnet50", ResNet50), ("mobilenet_v2", MobileNetV2)):
            model = trained_statistics(build(), (4, 3, 224, 224))
            variants = {"original (BatchNorm)": model}
            for target in ("groupnorm", "layernorm", "fold"):
                variants[target] = normswap.convert(model, x, to=target).model
            paths = {
                label: normswap.export_onnx(m, x, Path(folder) / f"{name}-{i}.onnx")
                for i, (label, m) in enumerate(variants.items())
            }
            for batch in (1, 8):
                base = latency(paths["original (BatchNorm)"], batch, repeats)
                for label, path in paths.items():
                    value = base if label.startswith("original") else latency(path, batch, repeats)
                    results[(name, batch, label)] = value
                    print(f"  {name:<13} batch {batch}  {label:<22} {value * 1000:8.2f} ms  x{value / base:.2f}")
    return results


if __name__ == "__main__":
    print("onnxruntime CPU latency, 2 intra-op threads, median:")
    main()
