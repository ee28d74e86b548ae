"""Renderers: each a pure function from a list of Reports to a string."""

from collections.abc import Callable, Sequence
from typing import Any

from .json import render_json, render_statistics_json
from .markdown import render_markdown
from .sarif import render_sarif
from .text import render_text

RENDERERS: dict[str, Callable[..., str]] = {"text": render_text, "json": render_json, "markdown": render_markdown, "sarif": render_sarif}


def render_statistics(reports: Sequence[Any], output_format: str = "text") -> str:
    """`--statistics`: findings per rule, as text or as JSON."""
    if output_format == "json":
        return render_statistics_json(reports)
    return render_text(reports, statistics_only=True)


__all__ = ["RENDERERS", "render_json", "render_markdown", "render_sarif", "render_statistics", "render_text"]
