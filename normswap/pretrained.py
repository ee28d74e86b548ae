"""Hugging Face round trip: a converted `PreTrainedModel` records its plan in its config, and
`from_pretrained` builds the converted architecture before its weights load (as transformers'
quantizers swap modules before loading).

`save_pretrained` writes the plan into config.json (`normswap_plan`). Plain
`ModelClass.from_pretrained(folder)` builds the original BatchNorm architecture and loads the
converted weights into it (a warning about missing running statistics, freshly initialised ones:
another function); `normswap.from_pretrained(ModelClass, folder)` applies the plan to the
architecture, then fills every tensor of it from the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .conversion import CONFIG_KEY
from .errors import CheckpointError, PlanError
from .plan import Plan
from .rewrite import apply_plan


def from_pretrained(model_class: Any, path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a converted Hugging Face model saved with `save_pretrained`.

    transformers reads the folder (its own key names, shards and dtypes) into the class's original
    architecture; the plan recorded in the config is applied to a fresh instance; every tensor of
    that converted architecture is then taken from what was loaded, and none may be missing.

    Args:
        model_class: the transformers class it was saved from (`ResNetForImageClassification`).
        path: the folder `save_pretrained` wrote.
        kwargs: passed to `model_class.from_pretrained` (e.g. `torch_dtype`).

    Returns:
        The converted model in eval mode.

    Raises:
        PlanError: the folder's config.json holds no normswap plan (not a converted model).
        CheckpointError: the folder lacks a tensor of the converted architecture.
    """
    folder = Path(path)
    loaded, info = model_class.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    recorded = getattr(loaded.config, CONFIG_KEY, None)
    if recorded is None:
        raise PlanError(
            f"'{folder}/config.json' holds no normswap plan, so this folder was not saved from a converted model; "
            f"load it with {model_class.__name__}.from_pretrained."
        )
    plan = Plan.from_dict(recorded, where=f"'{folder}/config.json' ({CONFIG_KEY})")
    model = apply_plan(model_class(loaded.config), plan, inplace=True).to(next(loaded.parameters()).dtype)
    state = loaded.state_dict()
    not_saved = set(info.get("missing_keys", ()))
    absent = [key for key in model.state_dict() if key not in state or key in not_saved]
    if absent:
        raise CheckpointError(
            f"'{folder}' lacks {', '.join(absent[:4])}{', ...' if len(absent) > 4 else ''} of {model_class.__name__} converted by its plan; "
            "save the converted model again with save_pretrained."
        )
    model.load_state_dict({key: state[key] for key in model.state_dict()})
    return model.eval()
