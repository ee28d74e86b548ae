"""Convert end to end vs a bare torch.onnx.export of the same converted model (memory: bench_memory.py)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import normswap
from nets import ResNet50, trained_statistics
from normswap.export.validate import _session


def main() -> dict:
    model = trained_statistics(ResNet50(), (4, 3, 224, 224))
    x = torch.randn(2, 3, 224, 224)
    with tempfile.TemporaryDirectory() as folder:
        normswap.export_onnx(model, x, Path(folder) / "warm.onnx")  # warm-up: exporter imports
        timings = {}
        start = time.perf_counter()
        conversion = normswap.convert(model, x)
        timings.update({f"convert: {k}": v for k, v in conversion.timings.items()})
        step = time.perf_counter()
        path = normswap.export_onnx(conversion.model, x, Path(folder) / "model.onnx")
        timings["export (normswap.export_onnx)"] = time.perf_counter() - step
        step = time.perf_counter()
        session = _session(path)
        timings["onnxruntime session"] = time.perf_counter() - step
        step = time.perf_counter()
        normswap.validate_onnx(conversion.model, path, x, original=model, plan=conversion.plan, session=session)
        timings["validate (runs, checks, drift)"] = time.perf_counter() - step
        total = time.perf_counter() - start
        step = time.perf_counter()
        torch.onnx.export(
            conversion.model.eval(),
            (x,),
            str(Path(folder) / "bare.onnx"),
            dynamo=True,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        bare = time.perf_counter() - step
    rest = total - timings["export (normswap.export_onnx)"] - timings["onnxruntime session"]
    print("convert end to end, ResNet-50 layout, input 2x3x224x224:")
    for key, value in timings.items():
        print(f"  {key:<34} {value:7.2f} s")
    print(f"  {'total':<34} {total:7.2f} s")
    print(f"  bare torch.onnx.export             {bare:7.2f} s")
    print(f"  everything but export + one session: {rest:.2f} s = {rest / bare:.0%} of the bare export (target <= 25%)")
    return {"rest_over_export": rest / bare}


if __name__ == "__main__":
    main()
