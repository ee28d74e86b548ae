"""Renderers: each a pure function from a list of Reports to a string."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .json import render_json, render_statistics_json
from .markdown import render_markdown
from .sarif import render_sarif
from .text import render_text

if TYPE_CHECKING:
    from ..report import Report

RENDERERS: dict[str, Callable[..., str]] = {
    "text": render_text,
    "json": render_json,
    "markdown": render_markdown,
    "sarif": render_sarif,
}
# `--format`: the text renderer's styles, then the other renderers
TEXT_STYLES = {"text": "auto", "grouped": "grouped", "full": "full", "concise": "concise"}
FORMATS = (*TEXT_STYLES, "json", "markdown", "sarif")


def render_statistics(reports: Sequence[Report], output_format: str = "text") -> str:
    """`--statistics`: findings per rule, as text or as JSON."""
    if output_format == "json":
        return render_statistics_json(reports)
    return render_text(reports, statistics_only=True)


__all__ = [
    "FORMATS",
    "RENDERERS",
    "TEXT_STYLES",
    "render_json",
    "render_markdown",
    "render_sarif",
    "render_statistics",
    "render_text",
]
