"""The normalization modules and functions normswap's targets build, as a public API.

Modules name their parameters `weight` and `bias` like BatchNorm's, so state_dict keys carry over.
"""

from __future__ import annotations

from .targets.fold import unchanged
from .targets.frozen import FrozenBatchNorm, frozen_batch_norm
from .targets.groupnorm import GroupNorm, GroupNormBN, group_norm
from .targets.layernorm import ChannelLayerNorm, LayerNorm, channel_layer_norm
from .targets.syncbn import sync_batch_norm

__all__ = [
    "ChannelLayerNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "GroupNormBN",
    "LayerNorm",
    "channel_layer_norm",
    "frozen_batch_norm",
    "group_norm",
    "sync_batch_norm",
    "unchanged",
]
