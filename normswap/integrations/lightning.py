"""normswap as a Lightning callback: `NormSwap` converts the LightningModule's model in `setup`,
before the optimizers are configured (so they hold the new parameters), with the context the
Trainer already knows, writes its report through the trainer's loggers, and keeps checkpoints
loadable into the converted model."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..context import Context
from ..conversion import Conversion, ConvertOptions, convert_with
from ..errors import IntegrationError
from ..plan import Plan
from ..report import ConversionSection, conversion_report
from ..rewrite import apply_plan
from ..torchutil import require_type
from . import missing

try:
    import lightning.pytorch as pl
except ImportError as exc:
    raise missing("lightning", "lightning") from exc

CHECKPOINT_KEY = "normswap"  # where a checkpoint holds the plan its weights were trained with
_FITTING = "fit"


def model_inputs(batch: Any) -> Any:
    """The model's inputs in a batch: a tensor batch itself, the first element of an
    `(inputs, targets)` tuple or list, else the batch as it is."""
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    return batch


@dataclass(frozen=True)
class NormSwapSettings:
    """How the callback converts.

    options: the conversion settings (`to`, group counts, `keep`, `heal`, ...).
    context: what the user says about training; the Trainer fills batch size, world size and
        gradient accumulation (a value given here that disagrees with the Trainer is an error).
    attribute: the LightningModule's submodule to convert ("backbone", "model.encoder");
        None: the LightningModule itself (its `forward` must run on the inputs).
    example_inputs: what the model runs on; None: `inputs` of the train dataloader's first batch.
    calibration_data: batches to fit each new layer's affine on (`inputs` picks the model's
        inputs in each), at most `calibration_batches` of them; None: no calibration.
    inputs: a batch -> the model's inputs (default `model_inputs`).
    """

    options: ConvertOptions = dataclasses.field(default_factory=ConvertOptions)
    context: Context | None = None
    attribute: str | None = None
    example_inputs: Any = None
    calibration_data: Iterable[Any] | None = None
    calibration_batches: int = 16
    inputs: Callable[[Any], Any] = model_inputs

    def __post_init__(self) -> None:
        require_type(self.options, ConvertOptions, "options", "NormSwap", "build one with normswap.ConvertOptions(...)")
        require_type(self.context, Context, "context", "NormSwap", "build one with normswap.Context(...)")
        if not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be a positive integer, got {self.calibration_batches!r}.")
        if not callable(self.inputs):
            raise TypeError(f"inputs must be a function from a batch to the model's inputs, got {self.inputs!r}.")


class NormSwap(pl.Callback):
    """Convert the model's BatchNorm with normswap before Lightning configures the optimizers.

        trainer = Trainer(callbacks=[NormSwap(to="auto", calibration_data=public_loader)], accumulate_grad_batches=4)
        trainer.fit(module)  # module's BatchNorm became GroupNorm / LayerNorm / ..., weights carried

    In `setup` (every rank, after the process group exists and before `configure_optimizers`)
    the model is converted in place with `normswap.convert`; the Trainer's per-device batch size
    (the train dataloader's), world size and `accumulate_grad_batches` fill the context. The
    report goes to every logger (`log_hyperparams`: the plan; `log_metrics`: agreement with the
    original after calibration) and, as `report.md` and `plan.json`, to `<log_dir>/normswap/`.
    Checkpoints carry the plan; resuming with `ckpt_path` checks it, and validating, testing or
    predicting from a checkpoint applies it before the weights load. `load_from_checkpoint`
    rebuilds a converted module outside a Trainer.

    Args: see `NormSwapSettings`; `to` and keyword `settings` override fields of `options`.

    Attributes:
        conversion: the last conversion (plan, findings, notes, calibration, drift).
        context: the context it was made for.
    """

    def __init__(
        self,
        to: str | None = None,
        *,
        context: Context | None = None,
        calibration_data: Iterable[Any] | None = None,
        calibration_batches: int = 16,
        example_inputs: Any = None,
        attribute: str | None = None,
        inputs: Callable[[Any], Any] = model_inputs,
        options: ConvertOptions | None = None,
        **settings: Any,
    ) -> None:
        require_type(options, ConvertOptions, "options", "NormSwap", "build one with normswap.ConvertOptions(...)")
        options = (options or ConvertOptions()).replace(**settings, **({"to": to} if to is not None else {}))
        self.settings = NormSwapSettings(
            options, context, attribute, example_inputs, calibration_data, calibration_batches, inputs
        )
        self.conversion: Conversion | None = None
        self.context: Context | None = None
        self._converted: dict[int, Plan] = {}  # id of a converted model -> its plan
        self._fitting: int | None = None  # id of the module this fit converted (or found converted)

    # ---- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _CheckPlanOnLoad.attach(self, pl_module)
        if stage != _FITTING:
            return  # a model to evaluate is converted only by the plan of a checkpoint it loads
        target = self._target(pl_module)
        self._fitting = id(target)
        if id(target) in self._converted:
            return  # converted by an earlier fit of this trainer
        self._refuse_if_optimizers_hold(trainer, target)
        loader = _train_dataloader(trainer)
        self.context = fill_context(self.settings.context, trainer, loader)
        example = self.settings.example_inputs
        if example is None:
            example = self._first_inputs(loader)
        conversion = convert_with(
            target,
            example,
            self.context,
            self.settings.options,
            calibration_data=self._calibration_batches(),
            inplace=True,
        )
        if conversion.model is not target:
            raise IntegrationError(
                f"Converting {self._name(pl_module)} rewrote functional batch_norm calls into a torch.fx graph, which cannot "
                "replace the module Lightning holds; pass NormSwap(attribute=...) naming the submodule that makes them."
            )
        self.conversion = conversion
        self._converted[id(target)] = conversion.plan
        self._report(trainer, pl_module, conversion)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._fitting != id(self._target(pl_module)):
            raise IntegrationError(
                "NormSwap was attached after this fit's setup, so the optimizers already hold the BatchNorm's parameters; "
                "pass it in Trainer(callbacks=[NormSwap(...)]) before fit."
            )

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        plan = self._converted.get(id(self._target(pl_module)))
        if plan is not None:
            checkpoint[CHECKPOINT_KEY] = {
                "attribute": self.settings.attribute or "",
                "plan": plan.to_dict(),
                "normswap": __version__,
            }

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _CheckPlanOnLoad.detach(pl_module)
        self._fitting = None

    # ---- the work --------------------------------------------------------------------------

    def on_checkpoint_loaded(self, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads a checkpoint's weights: a model not yet converted gets the
        checkpoint's plan; a converted one must have been converted by that plan."""
        stored = plan_in_checkpoint(checkpoint, self.settings.attribute)
        target = self._target(pl_module)
        applied = self._converted.get(id(target))
        if stored is None:
            unknown = sorted(set(checkpoint.get("state_dict", {})) - set(pl_module.state_dict()))
            if applied is not None and unknown:
                raise IntegrationError(
                    f"The checkpoint holds weights of the model before conversion ({unknown[0]}, ...), which ckpt_path cannot "
                    "resume into the converted one; load them into the module before fit (load_state_dict), and NormSwap "
                    "converts them."
                )
            return
        if applied is None:
            converted = apply_plan(target, stored, inplace=True)
            self._converted[id(converted)] = stored
            return
        if _decisions(applied) != _decisions(stored):
            raise IntegrationError(
                f"The checkpoint was trained with normswap plan ({_counts(stored)}), but this run converted "
                f"{self._name(pl_module)} to ({_counts(applied)}); give NormSwap the settings of the run that saved it."
            )

    def _target(self, pl_module: Any) -> nn.Module:
        attribute = self.settings.attribute
        if attribute is None:
            if type(pl_module).forward is pl.LightningModule.forward:
                raise IntegrationError(
                    f"{type(pl_module).__name__} defines no forward, so NormSwap cannot run it; pass NormSwap(attribute=...) "
                    "naming the submodule training_step calls (e.g. attribute='model')."
                )
            return pl_module
        try:
            target = pl_module.get_submodule(attribute)
        except AttributeError:
            raise IntegrationError(
                f"NormSwap(attribute={attribute!r}): {type(pl_module).__name__} has no submodule '{attribute}'; "
                f"its submodules are: {', '.join(name for name, _ in pl_module.named_children())}."
            ) from None
        return target

    def _name(self, pl_module: Any) -> str:
        name = type(pl_module).__name__
        return f"{name}.{self.settings.attribute}" if self.settings.attribute else name

    def _refuse_if_optimizers_hold(self, trainer: Any, target: nn.Module) -> None:
        held = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
        if held & {id(p) for p in target.parameters()}:
            raise IntegrationError(
                "NormSwap runs after the optimizers were configured: they hold the BatchNorm's parameters, which a "
                "conversion replaces; pass it in Trainer(callbacks=[NormSwap(...)]) before fit."
            )

    def _first_inputs(self, loader: Any) -> Any:
        if loader is None:
            return None  # no train dataloader to read: every BatchNorm judged from its constructor arguments
        for batch in loader:
            return self.settings.inputs(batch)
        raise IntegrationError(
            "The train dataloader is empty, so NormSwap has no example inputs; pass example_inputs=."
        )

    def _calibration_batches(self) -> list[Any] | None:
        data = self.settings.calibration_data
        if data is None:
            return None
        return [self.settings.inputs(batch) for batch in islice(data, self.settings.calibration_batches)]

    def _report(self, trainer: Any, pl_module: Any, conversion: Conversion) -> None:
        """Through the loggers: the plan as hyperparameters, agreement with the original as
        metrics, and report.md / plan.json in `<log_dir>/normswap/` (global rank zero)."""
        assert self.context is not None
        counts = conversion.plan.counts()
        summary = (
            f"NormSwap converted {self._name(pl_module)}: "
            f"{', '.join(f'{n} × {t}' for t, n in counts.items()) or 'nothing to convert'} "
            f"(captured with {conversion.capture_method}; {_context_text(self.context)})"
        )
        pl.utilities.rank_zero_info(summary)
        if not trainer.loggers:
            return
        directory = Path(trainer.log_dir or trainer.default_root_dir) / "normswap"  # log_dir: on every rank
        if not trainer.is_global_zero:
            return
        metrics = {
            f"normswap/top1_agreement_{stage}": drift.top1_agreement
            for stage, drift in conversion.drift.items()
            if drift.top1_agreement is not None
        }
        for logger in trainer.loggers:
            logger.log_hyperparams({"normswap": {"to": self.settings.options.to, **counts}})
            if metrics:
                logger.log_metrics(metrics, step=0)
        report = conversion_report(self._name(pl_module), conversion, self.context, ConversionSection.of(conversion))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "report.md").write_text(report.to_markdown(), encoding="utf-8")
        (directory / "plan.json").write_text(conversion.plan.to_json(), encoding="utf-8")


def fill_context(given: Context | None, trainer: Any, loader: Any) -> Context:
    """The context with what the Trainer knows: the per-device batch size (the train dataloader's:
    Lightning's loaders hold one process's batch), the world size and `accumulate_grad_batches`.

    Raises:
        IntegrationError: a value `given` sets that disagrees with the Trainer's.
    """
    known = {
        "batch_size": _batch_size(loader),
        "world_size": trainer.world_size,
        "accumulation": trainer.accumulate_grad_batches if isinstance(trainer.accumulate_grad_batches, int) else None,
    }
    given = given or Context()
    defaults = Context()
    for name, value in known.items():
        said = getattr(given, name)
        if value is not None and said != getattr(defaults, name) and said != value:
            raise IntegrationError(
                f"Context({name}={said!r}) disagrees with the Trainer's {name.replace('_', ' ')} {value}; "
                f"leave it out, NormSwap reads it from the Trainer."
            )
    return given.replace(**known)


def plan_in_checkpoint(checkpoint: dict[str, Any], attribute: str | None = None) -> Plan | None:
    """The plan a Lightning checkpoint's weights were trained with (None: not one NormSwap saved).

    Raises:
        IntegrationError: the plan is for another submodule than `attribute`.
    """
    entry = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(entry, dict) or "plan" not in entry:
        return None
    if attribute is not None and entry.get("attribute", "") != (attribute or ""):
        raise IntegrationError(
            f"The checkpoint's normswap plan converts the submodule '{entry.get('attribute', '')}', not '{attribute}'; "
            "give NormSwap the attribute of the run that saved it."
        )
    return Plan.from_dict(entry["plan"], where="the checkpoint's normswap plan")


def load_from_checkpoint(module_class: Any, checkpoint_path: str | Path, **kwargs: Any) -> Any:
    """`module_class.load_from_checkpoint(checkpoint_path, **kwargs)` for a checkpoint NormSwap
    trained: the module is built, converted by the checkpoint's plan, then given its weights."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    plan = plan_in_checkpoint(checkpoint)
    if plan is None:
        return module_class.load_from_checkpoint(checkpoint_path, **kwargs)
    attribute = checkpoint[CHECKPOINT_KEY].get("attribute", "")
    with warnings.catch_warnings():  # the weights load twice: first into the BatchNorm model, which misses some
        warnings.filterwarnings(
            "ignore", message="Found keys that are in the model state dict but not in the checkpoint"
        )
        module = module_class.load_from_checkpoint(checkpoint_path, strict=False, **kwargs)
    target = module.get_submodule(attribute) if attribute else module
    if apply_plan(target, plan, inplace=True) is not target:
        raise IntegrationError(
            f"The checkpoint's plan rewrites functional batch_norm calls of {module_class.__name__}, which makes a new "
            "module; apply it with normswap.apply_plan to the submodule that makes them."
        )
    module.load_state_dict(checkpoint["state_dict"])
    return module


class _CheckPlanOnLoad:
    """Stands in for the LightningModule's `on_load_checkpoint` while the callback is set up:
    Lightning calls it with the checkpoint before it loads the weights (a callback's own hook
    comes after), which is when a plan can still be applied or checked."""

    def __init__(self, callback: NormSwap, pl_module: Any) -> None:
        self.callback, self.pl_module = callback, pl_module
        self.original = type(pl_module).on_load_checkpoint.__get__(pl_module)

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        self.callback.on_checkpoint_loaded(self.pl_module, checkpoint)
        self.original(checkpoint)

    @classmethod
    def attach(cls, callback: NormSwap, pl_module: Any) -> None:
        pl_module.__dict__["on_load_checkpoint"] = cls(callback, pl_module)

    @staticmethod
    def detach(pl_module: Any) -> None:
        pl_module.__dict__.pop("on_load_checkpoint", None)


def _train_dataloader(trainer: Any) -> Any:
    """The loader `fit` was given or the train_dataloader hook returns (before Lightning sets it
    up: one process's loader, without the distributed sampler it adds later)."""
    source = trainer.fit_loop._data_source  # Lightning's own record of where the train data comes from
    return source.dataloader() if source.is_defined() else None


def _batch_size(loader: Any) -> int | None:
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) else None


def _decisions(plan: Plan) -> list[tuple[str, str, dict[str, Any]]]:
    """What a plan does to each site (not why)."""
    return [(entry.name, entry.target, entry.to_dict().get("params", {})) for entry in plan]


def _counts(plan: Plan) -> str:
    return ", ".join(f"{n} × {t}" for t, n in plan.counts().items())


def _context_text(context: Context) -> str:
    batch = "unknown batch size" if context.batch_size is None else f"{context.batch_size} sample(s) per device"
    accumulated = f", accumulated over {context.accumulation} micro-batches" if context.accumulation > 1 else ""
    return f"{batch} on {context.world_size} device(s){accumulated}"


__all__ = [
    "CHECKPOINT_KEY",
    "NormSwap",
    "NormSwapSettings",
    "fill_context",
    "load_from_checkpoint",
    "model_inputs",
    "plan_in_checkpoint",
]
