"""Checkpoints: safe loading (weights_only / safetensors), nested and prefixed layouts, fitting to a
model with a readable mismatch list, atomic saving in the input's format."""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, OutputError
from .files import write_with
from .torchutil import pickle_globals

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors and how they were laid out in the file."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    format: str  # "safetensors" or "torch"
    nested_key: str | None = None
    prefix: str | None = None

    @property
    def weights_name(self) -> str:
        return "model.safetensors" if self.format == "safetensors" else "model.pt"


def load_checkpoint(path: str | Path, *, trust: bool = False) -> Checkpoint:
    """Load tensors without running code (unless `trust`): .safetensors or a torch file read with
    weights_only=True; a whole pickled nn.Module only when trusted.

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file, untrusted code, not a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint '{path}' does not exist; check the path.")
    if path.is_dir():
        raise CheckpointError(f"Checkpoint '{path}' is a directory; give the weights file inside it.")
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint '{path}' is not a regular file (a pipe or device?); give a saved weights file."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint '{path}' is empty (0 bytes); it was probably not written completely.")
    if path.suffix == ".safetensors":
        return Checkpoint(path, _load_safetensors(path), "safetensors")
    if _looks_like_safetensors(path):
        raise CheckpointError(
            f"Checkpoint '{path}' is a safetensors file with another suffix; rename it to end in .safetensors."
        )
    obj = _load_torch(path, trust)
    if isinstance(obj, nn.Module):
        return Checkpoint(path, dict(obj.state_dict()), "torch", nested_key="<pickled module>")
    state, nested = _find_state_dict(obj, path)
    return Checkpoint(path, state, "torch", nested_key=nested)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # any reader failure is the file's problem: one sentence, with the cause
        raise CheckpointError(
            f"Checkpoint '{path}' is not a readable safetensors file ({_first_line(exc)}); it may be truncated or corrupt."
        ) from exc


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors header: a little-endian u64 length, then a JSON object."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _is_torch_file(path: Path) -> bool:
    """A zip archive (torch.save's format since 1.6) or a pickle (protocol 2+ starts with 0x80)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def _load_torch(path: Path, trust: bool) -> Any:
    if not _is_torch_file(path):
        raise CheckpointError(
            f"Checkpoint '{path}' is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)."
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        names = pickle_globals(path) if not trust else []
        if names or "Unsupported global" in str(exc):
            what = f" ({', '.join(names[:3])})" if names else ""
            raise CheckpointError(
                f"Checkpoint '{path}' contains Python objects{what} that would run code when loaded, so normswap refused to "
                "load it; pass --trust-checkpoint (trust_checkpoint=True) only if you trust its source."
            ) from None
        raise CheckpointError(
            f"Checkpoint '{path}' could not be read as a PyTorch checkpoint (its pickle is not one torch.load reads safely)."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        text = _first_line(exc)
        if (
            "failed finding central directory" in text
            or isinstance(exc, (EOFError, OSError))
            or "truncated" in text.lower()
        ):
            raise CheckpointError(
                f"Checkpoint '{path}' is truncated or corrupt ({text}); re-save or re-download it."
            ) from exc
        raise CheckpointError(f"Checkpoint '{path}' could not be read as a PyTorch checkpoint ({text}).") from exc
    except Exception as exc:  # any reader failure is the file's problem: one sentence, with the cause
        raise CheckpointError(
            f"Checkpoint '{path}' could not be read as a PyTorch checkpoint ({_first_line(exc)})."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _find_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _is_tensor_mapping(inner):
                return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}, key
        if _is_tensor_mapping(obj):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, None
    raise CheckpointError(
        f"Checkpoint '{path}' holds a {type(obj).__name__} without model weights; expected a state_dict "
        f"(names -> tensors), possibly under one of the keys {', '.join(NESTED_KEYS)}."
    )


def fit_to_model(checkpoint: Checkpoint, model: nn.Module, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors renamed to `model`'s keys (stripping data-parallel, Lightning and
    torch.compile prefixes, stacked too: `module._orig_mod.`, when that makes them fit), checked key
    by key and shape by shape.

    Args:
        prefix: take only the tensors under this key prefix (one model of a checkpoint holding
            several, e.g. "model." beside "teacher."), then strip it.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped keys; naming the models of a
            checkpoint that holds several, and how to choose one.
    """
    expected = model.state_dict()
    state = checkpoint.state_dict
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(
                f"Checkpoint '{checkpoint.path}' holds no tensor under the prefix '{prefix}'; its keys start with "
                f"{_short(sorted({_first(k) for k in checkpoint.state_dict}))}."
            )
    best, best_prefix = _stripped(state, expected)
    checkpoint.prefix = "".join(p for p in (prefix, best_prefix) if p) or None
    if best_prefix:
        log.info("stripped the prefix %r from the keys of %s", best_prefix, checkpoint.path)
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # absent from older checkpoints
    mistyped = sorted(
        f"{k} ({best[k].dtype} for a {expected[k].dtype} parameter)"
        for k in set(best) & set(expected)
        if expected[k].is_floating_point() and not best[k].is_floating_point()
    )
    if mistyped:
        raise CheckpointError(
            f"Checkpoint '{checkpoint.path}' holds non-real or integer values where {type(model).__name__} has floating-point tensors: "
            f"{_short(mistyped)}; it is not a checkpoint of this model (or was saved quantized)."
        )
    nonfinite = sorted(
        k for k, v in best.items() if k in expected and v.is_floating_point() and not bool(torch.isfinite(v).all())
    )
    if nonfinite:
        raise CheckpointError(
            f"Checkpoint '{checkpoint.path}' holds NaN or infinite values in {_short(nonfinite)}; the training that wrote it diverged, use an earlier checkpoint."
        )
    negative = sorted(
        k
        for k, v in best.items()
        if k in expected and k.endswith("running_var") and v.is_floating_point() and bool((v < 0).any())
    )
    if negative:
        raise CheckpointError(
            f"Checkpoint '{checkpoint.path}' holds negative running variances in {_short(negative)}; a variance cannot be negative, "
            "so the file is corrupt or not a BatchNorm checkpoint."
        )
    missing = sorted(set(expected) - set(best) - optional)
    unexpected = sorted(set(best) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(best[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(best) & set(expected)
        if tuple(best[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = [
            f"{label}: {_short(items)}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("mis-shaped keys", misshaped),
            )
            if items
        ]
        models = [] if prefix else _models_inside(state, expected)
        if len(models) > 1:
            chosen = next((m for m in models if m.startswith(("model.", "student."))), models[0])
            raise CheckpointError(
                f"Checkpoint '{checkpoint.path}' holds {len(models)} models, under {', '.join(repr(m) for m in models)}, "
                f"each with the keys of {type(model).__name__}; choose one with --checkpoint-prefix, "
                f"e.g. --checkpoint-prefix {chosen} (JobOptions(checkpoint_prefix='{chosen}'))."
            )
        raise CheckpointError(
            f"Checkpoint '{checkpoint.path}' does not fit {type(model).__name__} ({'; '.join(parts)}); check --model and its -k arguments."
        )
    return {k: v for k, v in best.items() if k in expected}


def _stripped(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """`state` with the known wrapper prefixes all its keys share stripped, one after the other
    (DDP over torch.compile saves `module._orig_mod.`), as far as that fits `expected` best; the
    prefix stripped ("" for none)."""
    stages = [(state, "")]
    current, stripped = state, ""
    while current:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in current)), None)
        if prefix is None:
            break
        current = {k[len(prefix) :]: v for k, v in current.items()}
        stripped += prefix
        stages.append((current, stripped))
    return max(stages, key=lambda stage: len(set(stage[0]) & set(expected)))  # the first best: least stripped


def _models_inside(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> list[str]:
    """The key prefixes ('teacher.', 'model.') under which a whole model of `expected`'s keys sits."""
    found = []
    for first in sorted({_first(k) for k in state}):
        group = {k[len(first) :]: v for k, v in state.items() if k.startswith(first)}
        fitted, wrapper = _stripped(group, expected)
        if set(expected) - {k for k in expected if k.endswith("num_batches_tracked")} <= set(fitted):
            found.append(first + wrapper)
    return found


def _first(key: str) -> str:
    """'teacher.' of 'teacher.layer1.weight'."""
    head, dot, _ = key.partition(".")
    return head + dot


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def finite_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict, checked to hold only finite numbers before anything is written.

    Raises:
        OutputError: naming the layer and the key that holds NaN or infinite values.
    """
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            layer = key.rpartition(".")[0] or key
            raise OutputError(
                f"The converted weights of layer '{layer}' ({key}) hold NaN or infinite values, so nothing was written; "
                "check the calibration data's scale, or heal with a lower --heal-lr."
            )
    return state


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Atomically save tensors as .safetensors or a torch file (by suffix)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        # safetensors refuses shared storage: give each tensor its own copy
        tensors = {k: v.clone() for k, v in tensors.items()}
        return write_with(path, lambda tmp: save_file(tensors, str(tmp)))
    return write_with(path, lambda tmp: torch.save(tensors, str(tmp)))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights that normswap wrote (safe loading)."""
    return load_checkpoint(path).state_dict
