"""The ecosystem tier: every test in this folder is marked `ecosystem` and runs on the real libraries."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

warnings.filterwarnings("ignore", category=UserWarning)  # the libraries' own deprecation chatter


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.ecosystem)
