"""Renderers: each a pure function from a list of Reports to a string."""

from collections.abc import Callable

from .json import render_json
from .markdown import render_markdown
from .sarif import render_sarif
from .text import render_text

RENDERERS: dict[str, Callable[..., str]] = {"text": render_text, "json": render_json, "markdown": render_markdown, "sarif": render_sarif}

__all__ = ["RENDERERS", "render_json", "render_markdown", "render_sarif", "render_text"]
