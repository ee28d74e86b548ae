"""Graph and module-tree passes that apply a normswap Plan (installed as `normswap.passes`)."""

from .base import Pass, PassError, PassManager, PassResult
from .contiguous_gradients import ContiguousGradients
from .out_of_place import OutOfPlaceForHooks
from .rewrite_functional import RewriteFunctionalBatchNorm
from .swap_modules import SwapBatchNormModules

__all__ = [
    "ContiguousGradients",
    "OutOfPlaceForHooks",
    "Pass",
    "PassError",
    "PassManager",
    "PassResult",
    "RewriteFunctionalBatchNorm",
    "SwapBatchNormModules",
]
