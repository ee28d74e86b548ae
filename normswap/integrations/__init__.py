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
        raise missing(library, integration) from exc


def missing(library: str, integration: str) -> ImportError:
    """The error for an integration whose library is not installed."""
    package = library.split(".")[0]
    return ImportError(
        f"normswap.integrations.{integration} needs {package}, which is not installed; "
        f"pip install {package} (or normswap's `ecosystem` extra)."
    )
