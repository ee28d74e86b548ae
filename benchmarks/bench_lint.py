"""Lint time on a ResNet-50-sized model, split into capture (trace + shapes), discovery, rules, rendering."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import normswap
from nets import ResNet50


def main(repeats: int = 5) -> dict:
    model = ResNet50().eval()
    x = torch.randn(2, 3, 224, 224)
    normswap.lint(model, x)  # warm-up: imports, first-call caches
    rows = []
    for _ in range(repeats):
        start = time.perf_counter()
        report = normswap.lint(model, x, normswap.Context(batch_size=2, world_size=8))
        total = time.perf_counter() - start
        from normswap.analysis import analyze

        analysis = analyze(model, x, normswap.Context(batch_size=2, world_size=8))
        start = time.perf_counter()
        report.to_text(), report.to_json(), report.to_sarif(), report.to_markdown()
        render = time.perf_counter() - start
        rows.append({**analysis.timings, "render(all 4)": render, "lint total": total})
    print(
        f"lint, ResNet-50 layout ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, {len(report.sites)} BatchNorm sites, input 2x3x224x224), median of {repeats}:"
    )
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    for key, value in medians.items():
        print(f"  {key:<16} {value * 1000:8.1f} ms")
    return medians


if __name__ == "__main__":
    main()
