"""A chart of what each converted site costs on its own (optional: needs matplotlib, the `plot` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..files import write_with

if TYPE_CHECKING:
    from ..calibration import Drift, SiteCost


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_attribution(attribution: Sequence[SiteCost], path: str | Path, title: str = "") -> Path:
    """A horizontal bar per site, worst at the top: the share of top-1 agreement (or of cosine
    similarity) lost when only that site is converted, swapped and calibrated. Written atomically.

    Uses matplotlib's object API with the Agg canvas: no pyplot state, no global backend change.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_agreement = all(c.swap.top1_agreement is not None for c in attribution)
    label = "top-1 agreement lost" if by_agreement else "cosine similarity lost"

    def lost(drift: Drift) -> float:
        return 1 - (drift.top1_agreement if by_agreement and drift.top1_agreement is not None else drift.cosine)

    rows = list(attribution)[::-1]  # barh draws bottom-up: worst on top
    names = [f"{c.site} ({c.target})" for c in rows]
    swap = [lost(c.swap) for c in rows]
    calibrated = [lost(c.calibrated) if c.calibrated else None for c in rows]
    figure = Figure(figsize=(7, 0.9 + 0.32 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(rows))
    axes.barh([p + 0.2 for p in positions], swap, height=0.4, color="#d62728", label="converted alone")
    if any(value is not None for value in calibrated):
        axes.barh(
            [p - 0.2 for p in positions],
            [v or 0 for v in calibrated],
            height=0.4,
            color="#1f77b4",
            label="converted alone, calibrated",
        )
    axes.set_yticks(list(positions), names, fontsize=8)
    axes.set_xlabel(label)
    axes.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    figure.legend(loc="outside lower center", ncols=2, fontsize=8)
    axes.set_title(title or "What each site costs on its own", fontsize=10)
    return write_with(path, lambda temporary: figure.savefig(str(temporary), format="png", dpi=110))
