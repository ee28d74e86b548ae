"""Hugging Face round trip: a converted `PreTrainedModel` records its plan in its config, and
`normswap.from_pretrained` has transformers build the class with that plan applied right after its
`__init__` (as transformers' quantizers swap modules before loading), so the weights load once.

`save_pretrained` writes the plan into config.json (`normswap_plan`). Plain
`ModelClass.from_pretrained(folder)` builds the original BatchNorm architecture and loads the
converted weights into it (a warning about missing running statistics, freshly initialised ones:
another function). Here the converted weights load into the architecture they belong to, where
and in the dtype transformers builds it (the meta device, then the checkpoint's tensors), and
transformers' loading report is about that load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .conversion import CONFIG_KEY
from .errors import CheckpointError, PlanError
from .plan import Plan
from .rewrite import apply_plan
from .sites import SiteKind


def from_pretrained(model_class: Any, path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a converted Hugging Face model saved with `save_pretrained`.

    The plan recorded in the folder's config is applied to the class's architecture as
    transformers builds it, before the weights load; every tensor of that converted architecture
    comes from the folder, and none may be missing or of another shape.

    Args:
        model_class: the transformers class it was saved from (`ResNetForImageClassification`).
        path: the folder `save_pretrained` wrote (or a Hub id).
        kwargs: passed to `model_class.from_pretrained` (e.g. `dtype`, `subfolder`, `revision`).

    Returns:
        The converted model, an instance of `model_class`, in eval mode.

    Raises:
        TypeError: `model_class` is not a transformers model class (an Auto class, say).
        PlanError: the folder's config.json holds no normswap plan (not a converted model), or its
            plan rewrites functional calls (a traced graph transformers cannot fill).
        CheckpointError: the folder lacks a tensor of the converted architecture, or holds one of
            another shape.
    """
    folder = Path(path)
    config_class = getattr(model_class, "config_class", None)
    if config_class is None or not isinstance(model_class, type) or not issubclass(model_class, nn.Module):
        raise TypeError(
            f"normswap.from_pretrained() needs the transformers model class the folder was saved from, got "
            f"{getattr(model_class, '__name__', model_class)!r} (an Auto class picks its class only while loading); "
            f"pass the class named by 'architectures' in '{folder}/config.json'."
        )
    config, _ = config_class.get_config_dict(str(folder), **kwargs)  # honours subfolder=, revision=, cache_dir=
    recorded = config.get(CONFIG_KEY)
    if recorded is None:
        raise PlanError(
            f"'{folder}/config.json' holds no normswap plan, so this folder was not saved from a converted model; "
            f"load it with {model_class.__name__}.from_pretrained."
        )
    plan = Plan.from_dict(recorded, where=f"'{folder}/config.json' ({CONFIG_KEY})")
    functional = [e.name for e in plan if e.kind is SiteKind.FUNCTIONAL and e.converts]
    if functional:  # apply_plan would return a traced graph, not the instance transformers fills
        raise PlanError(
            f"The plan in '{folder}/config.json' rewrites functional batch_norm calls ({', '.join(functional)}) into a "
            f"traced graph transformers cannot load weights into; build it with "
            f"normswap.apply_plan({model_class.__name__}(config), plan) and load the folder's model.safetensors into it."
        )
    loaded, info = _converting(model_class, plan).from_pretrained(str(folder), output_loading_info=True, **kwargs)
    loaded.__class__ = model_class  # the subclass only added the plan to __init__: the user's class, as saved
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise CheckpointError(
            f"'{folder}' lacks {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} of "
            f"{model_class.__name__} converted by its plan; save the converted model again with save_pretrained."
        )
    # only with ignore_mismatched_sizes=True (transformers raises otherwise), as (key, folder's shape, model's shape)
    mismatched = sorted(info.get("mismatched_keys", ()))
    if mismatched:
        key, saved, built = mismatched[0]
        raise CheckpointError(
            f"'{folder}' holds {key} of shape {list(saved)} where {model_class.__name__} converted by its plan has "
            f"{list(built)}{f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''}; the folder's weights "
            "are not of the model its plan describes: save the converted model again with save_pretrained."
        )
    return loaded.eval()


def _converting(model_class: Any, plan: Plan) -> Any:
    """A subclass of `model_class` whose `__init__` ends by applying `plan` in place: what
    transformers builds (under its meta-device and dtype contexts), then fills from the folder."""

    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        model_class.__init__(self, *args, **kwargs)
        apply_plan(self, plan, inplace=True)

    namespace = {"__init__": __init__, "__module__": model_class.__module__, "__qualname__": model_class.__qualname__}
    return type(model_class.__name__, (model_class,), namespace)
