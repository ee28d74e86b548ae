"""Hugging Face round trip: a converted `PreTrainedModel` records its plan in its config, and
`from_pretrained` builds the converted architecture before its weights load (as transformers'
quantizers swap modules before loading).

`save_pretrained` writes the plan into config.json (`normswap_plan`). Plain
`ModelClass.from_pretrained(folder)` would build the original BatchNorm architecture and load the
converted weights into it (a warning about missing running statistics, freshly initialised ones,
a different function); `normswap.from_pretrained(ModelClass, folder)` builds the model from the
config, applies the plan, then loads every weight strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_weights
from .conversion import CONFIG_KEY
from .errors import CheckpointError, PlanError
from .plan import Plan
from .rewrite import apply_plan

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def from_pretrained(model_class: Any, path: str | Path, **config_overrides: Any) -> nn.Module:
    """Load a converted Hugging Face model saved with `save_pretrained`.

    Args:
        model_class: the transformers class it was saved from (`ResNetForImageClassification`).
        path: the folder `save_pretrained` wrote (config.json, model.safetensors, possibly sharded).
        config_overrides: passed to `model_class.config_class.from_pretrained`.

    Returns:
        The converted model in eval mode, every weight loaded.

    Raises:
        PlanError: the folder's config.json holds no normswap plan (not a converted model).
        CheckpointError: its weights are missing or do not fit the converted architecture.
    """
    folder = Path(path)
    config = model_class.config_class.from_pretrained(str(folder), **config_overrides)
    recorded = getattr(config, CONFIG_KEY, None)
    if recorded is None:
        raise PlanError(
            f"'{folder}/config.json' holds no normswap plan, so this folder was not saved from a converted model; "
            f"load it with {model_class.__name__}.from_pretrained."
        )
    plan = Plan.from_dict(recorded, where=f"'{folder}/config.json' ({CONFIG_KEY})")
    model = apply_plan(model_class(config), plan, inplace=True)
    state = _weights(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # save_pretrained writes a tied weight once
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(t) for name, t in tensors.items() if name in state}
    missing = [key for key in missing if id(tensors[key]) not in loaded]
    if missing or unexpected:
        what = f"misses {', '.join(missing[:4])}" if missing else f"has unexpected {', '.join(unexpected[:4])}"
        raise CheckpointError(
            f"The weights in '{folder}' do not fit {model_class.__name__} converted by its plan: the checkpoint {what}; "
            "save the converted model again with save_pretrained."
        )
    return model.eval()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of a save_pretrained folder: one weights file, or the shards of an index."""
    for name in _WEIGHTS:
        if (folder / name).is_file():
            return load_weights(folder / name)
    for name in _INDEXES:
        index = folder / name
        if index.is_file():
            shards = dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_weights(folder / shard))
            return state
    raise CheckpointError(f"'{folder}' has no {' or '.join(_WEIGHTS)}; give the folder save_pretrained wrote.")
