"""Run every benchmark, each in a fresh process (memory and first-call costs stay honest):

python benchmarks/run_all.py
"""

import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
BENCHMARKS = (
    "bench_lint",
    "bench_scaling",
    "bench_convert",
    "bench_memory",
    "bench_latency",
    "bench_formulations",
    "bench_calibration_quality",
    "bench_calibration",
    "bench_heal_step",
)

print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
failed = []
for name in BENCHMARKS:
    print(f"\n== {name} ==", flush=True)
    if subprocess.run([sys.executable, str(HERE / f"{name}.py")]).returncode:
        failed.append(name)
if failed:
    sys.exit(f"failed: {', '.join(failed)}")
