"""Scaling: lint, rewrite and end-to-end convert time for 100, 1,000 and 10,000 BatchNorm sites;
ratio time(10x) / time(1x) (target <= x12 for lint and rewrite, <= x11 for convert)."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import normswap
from nets import DeepChain


def main(sizes: tuple[int, ...] = (100, 1000, 10000)) -> dict:
    x = torch.randn(2, 8, 4)
    results = {}
    normswap.convert(DeepChain(10), x)  # warm-up
    for sites in sizes:
        model = DeepChain(sites).eval()
        start = time.perf_counter()
        normswap.lint(model, x)
        lint_time = time.perf_counter() - start
        start = time.perf_counter()
        conversion = normswap.convert(model, x, to="groupnorm")  # copy, capture, plan, rewrite, post-condition
        convert_time = time.perf_counter() - start
        results[sites] = (lint_time, conversion.timings["rewrite"], convert_time, conversion.timings)
    print("scaling on DeepChain (Conv1d -> BatchNorm1d -> ReLU blocks):")
    print(f"  {'sites':>6} {'lint s':>8} {'rewrite s':>10} {'convert s':>10}   convert stages (s)")
    for sites, (lint_time, rewrite, convert_time, stages) in results.items():
        detail = ", ".join(f"{k} {v:.3f}" for k, v in stages.items())
        print(f"  {sites:>6} {lint_time:8.3f} {rewrite:10.4f} {convert_time:10.3f}   {detail}")
    for small, large in itertools.pairwise(sizes):
        (l1, r1, c1, _), (l2, r2, c2, _) = results[small], results[large]
        print(
            f"  x{large // small} sites ({small} -> {large}): lint x{l2 / l1:.1f}, rewrite x{r2 / r1:.1f}, convert x{c2 / c1:.1f}"
        )
    return results


if __name__ == "__main__":
    main()
