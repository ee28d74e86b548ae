"""Run every benchmark and print its figures: python benchmarks/run_all.py"""
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_calibration  # noqa: E402
import bench_convert  # noqa: E402
import bench_formulations  # noqa: E402
import bench_latency  # noqa: E402
import bench_lint  # noqa: E402
import bench_memory  # noqa: E402
import bench_scaling  # noqa: E402

print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
for bench in (bench_lint, bench_scaling, bench_convert, bench_memory, bench_latency, bench_formulations, bench_calibration):
    print(f"\n== {bench.__name__} ==")
    bench.main()
