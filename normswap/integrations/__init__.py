"""normswap inside the training libraries its users run: `normswap.integrations.opacus` (Opacus'
BatchNorm fixer) and `normswap.integrations.lightning` (a Lightning callback). Each imports its
library itself, so `import normswap` never needs them."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(library: str, integration: str) -> ModuleType:
    """Import `library` for `integration`, or say in one sentence how to get it.

    Raises:
        ImportError: the library is not installed.
    """
    try:
        return importlib.import_module(library)
    except ImportError as exc:
        raise ImportError(
            f"normswap.integrations.{integration} needs {library}, which is not installed; "
            f"pip install {library} (or normswap's `ecosystem` extra)."
        ) from exc
