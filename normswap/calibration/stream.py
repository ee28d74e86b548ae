"""Calibration and healing data as the user has it — a list of batches, a DataLoader, a Dataset,
one tensor of samples — read as batches of model inputs, again on every pass, with bounded memory.

Labels are dropped: a batch holding more items than the model takes inputs keeps the first ones.
Held-out data is split off by sample (a Dataset, a DataLoader over one) or by batch (lists,
iterables) and never trained on; under torchrun the training part is sharded across ranks.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Sampler, Subset

from ..errors import CalibrationError

DEFAULT_BATCH_SIZE = 64  # for a Dataset or a tensor of samples, which come without one


class Split(NamedTuple):
    """Data split once: the part that calibrates and heals, the held-out batches (in memory), and
    where each part starts in the data as given, in batches, for messages naming a batch (0 for a
    Dataset, which is split by sample)."""

    train: InputBatches
    heldout: list[tuple]
    heldout_from: int = 0

    @property
    def train_from(self) -> int:
        return self.train.skip


@dataclass(frozen=True)
class InputBatches:
    """Batches of model inputs (tuples), read again on every pass.

    `samples` is what one pass yields when that is known without reading the data. `notes` (shared
    by the parts split from one source) say what was done to the data.
    """

    read: Callable[[], Iterable[Any]]
    inputs: int | None = None  # leading items of a batch the model takes (None: all)
    samples: int | None = None
    notes: list[str] = field(default_factory=list)
    dataset: Any = None  # map-style: split and sharded by sample, through a rebuilt loader
    loader: DataLoader | None = None  # whose settings a rebuilt loader keeps
    skip: int = 0  # leading batches that belong to the held-out part (streams)
    shard: tuple[int, int] = (0, 1)  # (rank, world): every world-th batch (not map-style)

    def __iter__(self) -> Iterator[tuple]:
        rank, world = self.shard
        for index, batch in enumerate(itertools.islice(self.read(), self.skip, None)):
            if index % world == rank:
                yield self._inputs_of(batch, index)

    def _inputs_of(self, batch: Any, index: int) -> tuple:
        items = _as_items(batch, index)
        if self.inputs is not None and len(items) > self.inputs:
            note = (
                f"the data's batches hold {len(items)} items and the model takes {self.inputs} input(s): "
                f"the last {len(items) - self.inputs} (labels) are ignored"
            )
            if note not in self.notes:
                self.notes.append(note)
            items = items[: self.inputs]
        _check_values(items, index)
        return items

    def head(self, samples: int | None) -> list[tuple]:
        """The first batches of one pass, in memory, holding at least `samples` samples (None: all)."""
        taken: list[tuple] = []
        count = 0
        for batch in self:
            taken.append(batch)
            count += batch_length(batch)
            if samples is not None and count >= samples:
                break
        if not taken:
            raise CalibrationError("Calibration data is empty; give at least one batch of inputs.")
        return taken

    def split(self, heldout_samples: int) -> Split:
        """The training part and the held-out batches (in memory), disjoint; about
        `heldout_samples` samples held out. One batch in all: nothing is held out."""
        if heldout_samples <= 0:
            return Split(self, [])
        if self.dataset is not None and self.samples is not None and self.samples > 1:
            held = min(heldout_samples, self.samples // 2)
            order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(0)).tolist()
            heldout = self._over(Subset(self.dataset, order[:held]), shuffle=False).head(None)
            return Split(self._over(Subset(self.dataset, order[held:])), heldout)
        if self.loader is None and not isinstance(self.read(), Iterator):  # batches in memory: the last ones
            batches = list(self)
            if len(batches) < 2:
                return Split(self, [])
            held = _count_for(batches[::-1], heldout_samples, most=len(batches) - 1)
            kept = batches[: len(batches) - held]
            return Split(
                dataclasses.replace(self, read=lambda: kept, samples=_samples(kept)), batches[len(kept) :], len(kept)
            )
        heldout = self.head(heldout_samples)  # a stream: its first batches, skipped in training
        rest = dataclasses.replace(self, skip=self.skip + len(heldout), samples=None)
        if next(iter(rest), None) is None:
            return Split(self, [])
        return Split(rest, heldout, self.skip)

    def sharded(self, rank: int, world: int) -> InputBatches:
        """This rank's part under data-parallel healing: a DistributedSampler over a map-style
        dataset, every `world`-th batch of anything else."""
        if world <= 1:
            return self
        if self.dataset is not None:
            from torch.utils.data.distributed import DistributedSampler

            sampler: DistributedSampler = DistributedSampler(
                self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=0
            )
            return self._over(self.dataset, sampler=sampler)
        return dataclasses.replace(self, samples=None, shard=(rank, world))

    def _over(self, dataset: Any, shuffle: bool | None = None, sampler: Sampler | None = None) -> InputBatches:
        """A loader over `dataset` with the settings of the one given (batch size, workers,
        collate function); shuffled when the given one was (or when there was none)."""
        old = self.loader
        settings: dict[str, Any] = {"batch_size": DEFAULT_BATCH_SIZE}
        if old is not None:
            settings.update(
                batch_size=old.batch_size or DEFAULT_BATCH_SIZE,
                num_workers=old.num_workers,
                collate_fn=old.collate_fn,
                pin_memory=old.pin_memory,
                drop_last=old.drop_last,
            )
        if sampler is not None:
            settings["sampler"] = sampler
        else:
            settings["shuffle"] = (
                (old is None or isinstance(old.sampler, RandomSampler)) if shuffle is None else shuffle
            )
            if settings["shuffle"]:
                settings["generator"] = torch.Generator().manual_seed(0)
        loader = DataLoader(dataset, **settings)
        return dataclasses.replace(self, read=lambda: loader, samples=len(dataset), dataset=dataset, loader=loader)


def input_batches(data: Any, *, inputs: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> InputBatches:
    """Read `data` as batches of model inputs.

    Args:
        data: a list of batches (tensors or tuples of tensors), a `DataLoader`, a map-style or
            iterable `Dataset` (batched by `batch_size`), one tensor of samples (first axis), or
            any iterable of batches (an iterator is read once and held in memory, with a note).
        inputs: how many inputs the model takes; items after them in a batch (labels) are
            dropped. None: every item is an input.
        batch_size: for a Dataset or a tensor of samples.
    """
    if isinstance(data, InputBatches):
        return data
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise CalibrationError("Calibration data is an empty tensor; give at least one sample.")
        batches = [data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)]
        return InputBatches(lambda: batches, inputs, data.shape[0])
    if isinstance(data, DataLoader):
        map_style = not isinstance(data.dataset, IterableDataset) and _sized(data.dataset) and data.batch_size
        if map_style:
            return InputBatches(lambda: data, inputs, len(data.dataset), dataset=data.dataset, loader=data)  # type: ignore[arg-type]
        return InputBatches(lambda: data, inputs, loader=data)
    if isinstance(data, IterableDataset):
        loader = DataLoader(data, batch_size=batch_size)
        return InputBatches(lambda: loader, inputs, loader=loader)
    if isinstance(data, Dataset) and _sized(data):
        return InputBatches(list, inputs)._over(data, shuffle=False)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        listed = list(data)
        return InputBatches(lambda: listed, inputs, sum(batch_length(_as_items(b, i)) for i, b in enumerate(listed)))
    if isinstance(data, Iterable):
        held = list(data)  # an iterator can be read only once
        return InputBatches(
            lambda: held,
            inputs,
            sum(batch_length(_as_items(b, i)) for i, b in enumerate(held)),
            notes=[
                f"the data was an iterator, which can be read only once: its {len(held)} batch(es) are held in memory "
                "(pass a DataLoader or a Dataset to stream)"
            ],
        )
    raise TypeError(
        f"calibration data must be batches of inputs (a list, a DataLoader, a Dataset or a tensor), got {type(data).__name__}."
    )


def model_inputs(model: nn.Module) -> int | None:
    """How many positional inputs `model.forward` requires (None: it takes *args, or none)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty) or None


def batch_length(batch: tuple) -> int:
    """The samples in a batch: the first axis of its first tensor that has one."""
    return next((int(x.shape[0]) for x in batch if isinstance(x, torch.Tensor) and x.dim()), 1)


def _samples(batches: Sequence[tuple]) -> int:
    return sum(batch_length(b) for b in batches)


def _count_for(batches: Sequence[tuple], samples: int, most: int) -> int:
    """How many of `batches`, from the front, hold `samples` samples (at least 1, at most `most`)."""
    count = total = 0
    for batch in batches:
        if count >= most or total >= samples:
            break
        count, total = count + 1, total + batch_length(batch)
    return max(1, min(count, most))


def _sized(dataset: Any) -> bool:
    try:
        return len(dataset) > 0
    except TypeError:
        return False


def _as_items(batch: Any, index: int) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    if isinstance(batch, dict):
        raise CalibrationError(
            f"Calibration batch {index} is a dict ({', '.join(map(str, list(batch)[:4]))}); give batches of input tensors in "
            "the order forward takes them (a Dataset that returns tuples)."
        )
    raise CalibrationError(
        f"Calibration batch {index} is a {type(batch).__name__}; give batches of input tensors (a tensor or a tuple of them)."
    )


def _check_values(items: tuple, index: int) -> None:
    for x in items:
        if isinstance(x, torch.Tensor) and x.is_complex():
            raise CalibrationError(
                f"Calibration batch {index} holds complex values; the model's inputs are real numbers."
            )
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise CalibrationError(f"Calibration batch {index} holds NaN or infinite values; clean the data first.")
