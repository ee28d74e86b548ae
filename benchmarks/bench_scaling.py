"""Scaling: lint and rewrite time for 100, 1,000 and 10,000 BatchNorm sites; ratio time(10x)/time(1x)."""

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
    normswap.lint(DeepChain(10), x)  # warm-up
    for sites in sizes:
        model = DeepChain(sites).eval()
        start = time.perf_counter()
        normswap.lint(model, x)
        lint_time = time.perf_counter() - start
        conversion = normswap.convert(model, x, to="groupnorm", inplace=True)
        results[sites] = (lint_time, conversion.timings["rewrite"], conversion.timings["plan"])
    print("scaling on DeepChain (Conv1d -> BatchNorm1d -> ReLU blocks):")
    print(f"  {'sites':>6} {'lint s':>9} {'rewrite s':>10} {'plan s':>8}")
    for sites, (lint_time, rewrite, plan) in results.items():
        print(f"  {sites:>6} {lint_time:9.3f} {rewrite:10.4f} {plan:8.4f}")
    for small, large in itertools.pairwise(sizes):
        (l1, r1, _), (l2, r2, _) = results[small], results[large]
        print(f"  x{large // small} sites ({small} -> {large}): lint x{l2 / l1:.1f}, rewrite x{r2 / r1:.1f} (target <= x12)")
    return results


if __name__ == "__main__":
    main()
