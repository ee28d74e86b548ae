"""Discovery: turn captured BatchNorm calls into Sites, one per module or functional call."""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.overrides import TorchFunctionMode

from .capture import BatchNormCall, Capture
from .capture.tracer import BATCH_NORM_FUNCTIONS
from .source import SourceLocation, built_from, construction_site
from .torchutil import is_replacement, is_torch_class, module_class, torch_base


class SiteKind(enum.StrEnum):
    """How a site uses BatchNorm semantics."""

    MODULE = "module"  # a torch.nn BatchNorm class
    SUBCLASS = "subclass"  # a class deriving from one (timm's BatchNormAct2d)
    FUNCTIONAL = "functional"  # `F.batch_norm` / `torch.batch_norm` called in forward
    LOOKALIKE = "lookalike"  # a class named *BatchNorm* that is not a torch BatchNorm


KINDS = tuple(kind.value for kind in SiteKind)


@dataclass
class Site:
    """One place where BatchNorm semantics are used.

    kind: see SiteKind.
    """

    name: str
    kind: SiteKind
    flavour: str
    num_features: int | None
    input_shape: tuple[int, ...] | None
    affine: bool
    track_running_stats: bool
    eps: float
    momentum: float | None
    call_count: int
    owner: str = ""
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    defined_at: SourceLocation | None = None
    built_from: SourceLocation | None = None  # the project's line that led to an external construction
    called_at: tuple[SourceLocation, ...] = ()
    batch_dependent_train: bool = True
    batch_dependent_eval: bool = False
    overrides_forward: bool = False
    submodules: tuple[str, ...] = ()  # "act (ReLU)": what a subclass's forward adds, kept by a swap
    feeds_from_input: bool = False
    producer_module: str | None = None  # the module whose output this site normalizes (FX graph only)
    producer_exclusive: bool = False  # that output feeds nothing else and the module runs once
    # why the producer's weights cannot absorb a fold ("" when they can): recomputed, shared...
    producer_weights_problem: str = ""
    hooked: bool = False  # forward hooks or pre-hooks on the BatchNorm itself (they see its input and output)
    # batch-dependent without any batch_norm call normswap could take over (statistics by hand)
    normalizes_by_hand: bool = False
    # tensors of the layer the model's forward reads directly (`self.bn.running_var`; FX graph only)
    read_attributes: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    # rows of the layer's dim 0 per sample of the model's batch: 1 when dim 0 is the batch, T for a
    # (T, N, H) sequence flattened to (T*N, H); None when dim 0 is no multiple of the batch (unknown)
    rows_per_sample: int | None = None
    # a rank-3 input: the upstream layer that shows its last axis is ordered, "" when none does
    # (a point set: kernel-1 convolutions; capture/order.py)
    order: str = ""
    # dim 0 of each call when the calls cut the example batch into chunks (ghost batch norm:
    # `x.chunk(n)` of the batch, one BatchNorm per chunk); () otherwise
    chunk_sizes: tuple[int, ...] = ()
    # the torch.nn BatchNorm class the module is or extends ("SyncBatchNorm" for timm's
    # SyncBatchNormAct, "_BatchNorm" for a class built on the base); "" for other sites
    torch_base: str = ""
    # a subclass whose forward computes more than torch's BatchNorm of its own tensors (an
    # activation, dropout, any submodule): measured by the probe, in this process
    adds_to_batchnorm: bool = False
    # the input rank its torch BatchNorm class takes (BatchNorm2d: 4; BatchNorm1d: 3, of its 2 or 3;
    # SyncBatchNorm: 4, of any), to run a layer the example did not reach; None: not a torch BatchNorm
    class_rank: int | None = None

    def __post_init__(self) -> None:
        self.kind = SiteKind(self.kind)  # a plain string from an API caller becomes the enum

    @property
    def input_rank(self) -> int | None:
        return len(self.input_shape) if self.input_shape is not None else None

    @property
    def ghost_batch(self) -> bool:
        """Whether its calls normalize chunks of one batch (ghost batch norm), not steps."""
        return bool(self.chunk_sizes)

    @property
    def batch_dependent(self) -> bool:
        return self.batch_dependent_train or self.batch_dependent_eval

    @property
    def reached(self) -> bool:
        """Whether the example inputs reached it (an unreached layer's shapes are not known)."""
        return self.call_count > 0

    @property
    def values_per_channel(self) -> int:
        """Values per channel in one sample: measured, else the fewest its class admits (a
        BatchNorm1d may normalize (N, C) features: one value; a 2d / 3d map has several)."""
        if self.spatial_size is not None:
            return self.spatial_size
        return 2 if self.flavour.endswith(("2d", "3d")) else 1

    @property
    def spatial_size(self) -> int | None:
        """Values per channel per sample (product of the dims after C); 1 for (N, C)."""
        if self.input_shape is None:
            return None
        size = 1
        for d in self.input_shape[2:]:
            size *= d
        return size

    @property
    def probe_shape(self) -> tuple[int, ...] | None:
        """An input shape to run the layer alone on: the captured one, else, for a layer the
        example did not reach, one its torch BatchNorm class takes ((2, C, 4, 4) for a 2d one);
        None when neither is known."""
        if self.input_shape is not None or self.num_features is None or self.class_rank is None:
            return self.input_shape
        return (2, self.num_features, *(4,) * (self.class_rank - 2))

    @property
    def location(self) -> SourceLocation | None:
        """Where to point a reader: the construction line, else the first call line."""
        return self.defined_at or (self.called_at[0] if self.called_at else None)


def discover(model: nn.Module, captured: Capture) -> list[Site]:
    """Group the captured calls into Sites (in first-call order) and describe each."""
    grouped: dict[str, list[BatchNormCall]] = {}
    for call in captured.calls:
        grouped.setdefault(call.name, []).append(call)
    modules = dict(model.named_modules())
    sites = []
    for name, calls in grouped.items():
        first = calls[0]
        if first.module is None:
            sites.append(_functional_site(name, calls))
        else:
            sites.append(_module_site(model, modules[first.module], name, calls))
    batch = next(
        (shape[0] for shape in captured.input_shapes if shape), None
    )  # the example inputs' batch (first input, dim 0)
    for site in sites:
        site.rows_per_sample = rows_per_sample(site.input_shape, batch)
        site.chunk_sizes = chunk_sizes([call.input_shape for call in grouped[site.name]], batch)
    sites.extend(_unreached_sites(model, modules, set(grouped)))
    parameter_names = _parameter_names(model)
    graph_reads = (
        {str(n.target) for n in captured.graph_module.graph.nodes if n.op == "get_attr"}
        if captured.graph_module is not None
        else set()
    )
    for site in sites:
        site.read_attributes = captured.attribute_reads.get(site.name, ())
        if site.producer_module is not None and site.producer_module in modules:
            producer = modules[site.producer_module]
            site.producer_weights_problem = weights_problem(
                producer, site.producer_module, parameter_names, graph_reads
            )
    return sites


def rows_per_sample(input_shape: tuple[int, ...] | None, batch: int | None) -> int | None:
    """How many rows of a layer's input (its dim 0) each sample of the model's batch makes, read
    off the shape captured at the example batch: 1 for a batch-first layer, T for DeepSpeech's
    SequenceWise (T*N, H); None when dim 0 is not a whole multiple of the batch."""
    if not input_shape or not batch or input_shape[0] % batch:
        return None
    return input_shape[0] // batch


def chunk_sizes(shapes: list[tuple[int, ...] | None], batch: int | None) -> tuple[int, ...]:
    """Dim 0 of each call when several calls of one layer cut the example batch into chunks
    (TabNet's ghost batch norm: `x.chunk(n)` of the batch, one BatchNorm per chunk, `torch.cat`):
    every call smaller than the batch, the same trailing dims, the sizes adding up to whole
    batches (one batch per forward, or one per step of a loop around the chunking); () otherwise."""
    if len(shapes) < 2 or not batch or any(not shape for shape in shapes):
        return ()
    known = [shape for shape in shapes if shape]
    if len({shape[1:] for shape in known}) != 1 or any(shape[0] >= batch for shape in known):
        return ()
    sizes = tuple(shape[0] for shape in known)
    return sizes if sum(sizes) % batch == 0 else ()


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each parameter object is reachable (a tied weight has several)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def weights_problem(
    producer: nn.Module, name: str, parameter_names: dict[int, list[str]], graph_reads: set[str] | None = None
) -> str:
    """Why folding a BatchNorm into `producer` would not keep the model's function ("" when it
    would): its weight must be a plain leaf Parameter of its own, used by nothing else (no other
    layer, no read of it in forward), and no forward hook may see the output it folds into."""
    from torch.nn.utils import parametrize

    if producer._forward_hooks:
        return "whose output a forward hook sees (it would see the folded output)"
    read = sorted(a for a in ("weight", "bias") if f"{name}.{a}" in (graph_reads or set()))
    if read:
        return f"whose {read[0]} forward also reads directly ({name}.{read[0]}): folding would change that use too"
    if parametrize.is_parametrized(producer):
        return "whose weight is computed by a parametrization (weight_norm / spectral_norm), which would overwrite the folded weight"
    for attribute in ("weight", "bias"):
        value = getattr(producer, attribute, None)
        if value is None:
            continue
        if not isinstance(producer._parameters.get(attribute), nn.Parameter):
            return f"whose {attribute} is recomputed before every call (a legacy weight_norm or spectral_norm hook), which would overwrite the folded {attribute}"
        others = [n for n in parameter_names.get(id(value), []) if n != f"{name}.{attribute}"]
        if others:
            return f"whose {attribute} is shared with {', '.join(others[:3])} (tied weights): folding would rescale those too"
    return ""


def _unreached_sites(model: nn.Module, modules: dict[str, nn.Module], called: set[str]) -> list[Site]:
    """BatchNorm modules forward did not reach on the example inputs: a branch other inputs take,
    one of several per-domain layers a forward argument selects, an auxiliary head. Other inputs
    may reach them, so they are judged as the BatchNorm they are (batch statistics in training;
    in eval mode too without running statistics), from their constructor arguments."""
    unreached = []
    for name, module in modules.items():
        if not isinstance(module, _BatchNorm) or is_replacement(module) or name in called:
            continue
        if any(name.startswith(f"{other}.") for other in called):
            continue  # part of a called BatchNorm-like module
        fields = _module_fields(model, module, name, None)
        site = Site(
            **fields,
            input_shape=None,
            call_count=0,
            batch_dependent_train=True,
            batch_dependent_eval=not fields["track_running_stats"],
            notes=["not reached by the example inputs"],
        )
        if site.overrides_forward:  # a subclass computing its statistics by hand is refused by name at planning
            site.normalizes_by_hand = probe(module, site.probe_shape).normalizes_by_hand
        unreached.append(site)
    return unreached


def _common(calls: list[BatchNormCall]) -> dict[str, Any]:
    first = calls[0]
    return {
        "input_shape": first.input_shape,
        "call_count": len(calls),
        "producers": tuple(dict.fromkeys(p for c in calls for p in c.producers)),
        "consumers": tuple(dict.fromkeys(u for c in calls for u in c.consumers)),
        "called_at": tuple(dict.fromkeys(c.called_at for c in calls if c.called_at is not None)),
        "feeds_from_input": any(p.startswith("input ") for c in calls for p in c.producers),
        "producer_module": first.producer_module if len(calls) == 1 else None,
        "producer_exclusive": len(calls) == 1 and first.producer_exclusive,
        "order": next((c.order for c in calls if c.order), ""),
    }


def _module_fields(
    model: nn.Module, module: nn.Module, name: str, input_shape: tuple[int, ...] | None
) -> dict[str, Any]:
    """The Site fields read off a BatchNorm(-like) module itself."""
    is_bn = isinstance(module, _BatchNorm)
    torch_class = is_torch_class(module)
    return {
        "name": name,
        "kind": SiteKind.MODULE if torch_class else (SiteKind.SUBCLASS if is_bn else SiteKind.LOOKALIKE),
        "flavour": module_class(module).__name__,
        "num_features": _num_features(module, input_shape),
        "affine": getattr(module, "weight", None) is not None,
        "track_running_stats": isinstance(getattr(module, "running_mean", None), torch.Tensor),
        "eps": float(getattr(module, "eps", 1e-5)),
        "momentum": getattr(module, "momentum", None),
        "owner": name,
        "defined_at": construction_site(model, name),
        "built_from": built_from(module),
        "overrides_forward": is_bn
        and not torch_class
        and getattr(module_class(module), "forward", None) is not _BatchNorm.forward,
        "hooked": bool(module._forward_hooks or module._forward_pre_hooks),
        "torch_base": torch_base(module_class(module)).__name__ if is_bn else "",
        "class_rank": _class_rank(module),
        "submodules": tuple(
            f"{child} ({type(m).__name__})" for child, m in module.named_children() if child != "parametrizations"
        )
        if not torch_class
        else (),
    }


def _module_site(model: nn.Module, module: nn.Module, name: str, calls: list[BatchNormCall]) -> Site:
    common = _common(calls)
    site = Site(**_module_fields(model, module, name, common["input_shape"]), **common)
    is_bn, overrides = isinstance(module, _BatchNorm), site.overrides_forward
    if is_bn and not overrides:
        # torch's BatchNorm: batch statistics in training; in eval too when it keeps no running stats.
        site.batch_dependent_train = True
        site.batch_dependent_eval = not site.track_running_stats
    else:
        behaviour = probe(module, site.input_shape)
        site.batch_dependent_train, site.batch_dependent_eval = (
            behaviour.batch_dependent_train,
            behaviour.batch_dependent_eval,
        )
        site.normalizes_by_hand = behaviour.normalizes_by_hand
        site.adds_to_batchnorm = bool(site.submodules) or not behaviour.plain
        if not site.batch_dependent:
            site.notes.append("output of each sample does not depend on the rest of the batch (a fixed affine)")
    return site


def _class_rank(module: nn.Module) -> int | None:
    """See Site.class_rank."""
    ranks = ((nn.BatchNorm1d, 3), (nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5), (nn.SyncBatchNorm, 4))
    return next((rank for cls, rank in ranks if isinstance(module, cls)), None)


def _num_features(module: nn.Module, input_shape: tuple[int, ...] | None) -> int | None:
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        return input_shape[1] if input_shape and len(input_shape) > 1 else None
    count = getattr(module, "num_features", None)
    if count is None and input_shape and len(input_shape) > 1:
        count = input_shape[1]
    return count


def _functional_site(name: str, calls: list[BatchNormCall]) -> Site:
    first = calls[0]
    common = _common(calls)
    shape = common["input_shape"]
    training_eval = first.training_in_eval if first.training_in_eval is not None else False
    training = first.training if first.training is not None else training_eval
    return Site(
        name=name,
        kind=SiteKind.FUNCTIONAL,
        flavour="F.batch_norm",
        num_features=shape[1] if shape and len(shape) > 1 else None,
        affine=bool(first.has_affine) if first.has_affine is not None else True,
        track_running_stats=bool(first.has_running_stats) if first.has_running_stats is not None else True,
        eps=first.eps if first.eps is not None else 1e-5,
        momentum=first.momentum,
        owner=first.owner,
        batch_dependent_train=training,
        batch_dependent_eval=training_eval,
        **common,
    )


@dataclass(frozen=True)
class Probe:
    """How one module behaves on its own, in train and in eval mode: is sample 0's output
    different inside a batch of 3 than alone, does its forward call batch_norm at all, and is
    its output what torch's BatchNorm computes from its tensors (nothing added: `plain`)."""

    batch_dependent_train: bool
    batch_dependent_eval: bool
    calls_batch_norm_train: bool = True
    calls_batch_norm_eval: bool = True
    plain: bool = False  # its output is torch's BatchNorm of its own tensors, in both modes

    @property
    def normalizes_by_hand(self) -> bool:
        """Batch-dependent in a mode where it makes no batch_norm call: statistics computed by hand."""
        return (self.batch_dependent_train and not self.calls_batch_norm_train) or (
            self.batch_dependent_eval and not self.calls_batch_norm_eval
        )


class _BatchNormCallCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in BATCH_NORM_FUNCTIONS
        return func(*args, **(kwargs or {}))


def probe(module: nn.Module, input_shape: tuple[int, ...] | None) -> Probe:
    """Run a copy of `module` (only its own training flag set; dropout and other stochastic
    submodules stay in eval mode) on random inputs of `input_shape`. Its parameters are set to
    random values first: a zero-initialised affine (timm's `zero_init_last` on a residual
    branch's last norm) maps every input to the same output and would hide the batch statistics.
    Its output is also compared with torch's BatchNorm of its own tensors (`Probe.plain`).
    Unknown shape: assume the worst."""
    if input_shape is None or len(input_shape) < 2:
        return Probe(True, True)
    copy_ = copy.deepcopy(module).eval()
    reference = next(iter(copy_.parameters()), None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in copy_.parameters():
            if parameter.is_floating_point() and not parameter.is_meta:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    x = torch.randn((3, *input_shape[1:]), generator=generator) * 2 + 1
    if reference is not None:
        x = x.to(device=reference.device, dtype=reference.dtype)
    dependent, calls, plain = [], [], []
    for training in (True, False):
        copy_.training = training
        counter = _BatchNormCallCounter()
        expected = _torch_batch_norm(copy_, x, training)  # outside the counter: not the module's call
        with torch.no_grad(), counter:
            try:
                output = copy_(x)
                plain.append(expected is not None and isinstance(output, torch.Tensor) and _close(output, expected))
                alone = copy_(x[:1])
            except (RuntimeError, ValueError):  # a module that rejects a batch of one depends on the batch
                dependent.append(True)
                calls.append(counter.count > 0)
                plain.append(False)
                continue
        dependent.append(not _close(output[:1], alone))
        calls.append(counter.count > 0)
    return Probe(dependent[0], dependent[1], calls[0], calls[1], plain=all(plain))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # 1e-4 relative: far above fp32 reduction-order noise, far below any batch statistic effect.
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def _torch_batch_norm(module: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor | None:
    """What torch's BatchNorm computes from the module's own tensors (read before its forward
    updates them; nothing is updated here); None when they are not BatchNorm's (a look-alike)."""
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    batch = training or not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor)
    try:
        with torch.no_grad():
            return torch.nn.functional.batch_norm(
                x,
                None if batch else mean,
                None if batch else var,
                getattr(module, "weight", None),
                getattr(module, "bias", None),
                batch,
                0.0,
                float(getattr(module, "eps", 1e-5)),
            )
    except (RuntimeError, TypeError, ValueError):  # tensors of another shape or kind: not BatchNorm's
        return None
