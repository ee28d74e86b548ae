"""The rule catalogue: one explicit tuple, in code order."""

from __future__ import annotations

from .base import Finding, FixSafety, Remedy, Rule, Severity, Skip, SourceFix
from .ns101_batchnorm_in_recurrence import BatchNormInRecurrence
from .ns102_batchnorm_over_sequence import BatchNormOverSequence
from .ns103_small_batch import SmallBatch
from .ns104_batch_of_one import BatchOfOne
from .ns105_unsynced_distributed import UnsyncedDistributed
from .ns106_privacy_incompatible import PrivacyIncompatible
from .ns107_batch_dependent_inference import BatchDependentInference
from .ns108_batchnorm_across_clients import BatchNormAcrossClients
from .ns201_functional_batchnorm import FunctionalBatchNorm
from .ns202_batchnorm_subclass import BatchNormSubclass
from .ns203_degenerate_groups import DegenerateGroups
from .ns204_momentum_as_decay import MomentumAsDecay
from .ns205_unreached_batchnorm import UnreachedBatchNorm
from .ns301_foldable_into_conv import FoldableIntoConv
from .ns302_freeze_for_finetune import FreezeForFinetune
from .ns901_not_traceable import NotTraceable

CATALOGUE: tuple[Rule, ...] = (
    BatchNormInRecurrence(),
    BatchNormOverSequence(),
    SmallBatch(),
    BatchOfOne(),
    UnsyncedDistributed(),
    PrivacyIncompatible(),
    BatchDependentInference(),
    BatchNormAcrossClients(),
    FunctionalBatchNorm(),
    BatchNormSubclass(),
    DegenerateGroups(),
    MomentumAsDecay(),
    UnreachedBatchNorm(),
    FoldableIntoConv(),
    FreezeForFinetune(),
    NotTraceable(),
)

__all__ = ["CATALOGUE", "Finding", "FixSafety", "Remedy", "Rule", "Severity", "Skip", "SourceFix"]
