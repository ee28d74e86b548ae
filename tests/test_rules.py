"""Every rule: a case that fires, a case that does not, an edge case."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from normswap import Context
from normswap.capture import Capture
from normswap.rules import CATALOGUE, Finding, Severity, Skip
from normswap.sites import Site

RULES = {rule.code: rule for rule in CATALOGUE}


def site(**overrides) -> Site:
    base = Site(
        name="layer.bn",
        kind="module",
        flavour="BatchNorm2d",
        num_features=64,
        input_shape=(8, 64, 14, 14),
        affine=True,
        track_running_stats=True,
        eps=1e-5,
        momentum=0.1,
        call_count=1,
        producers=("layer.conv (Conv2d)",),
        consumers=("relu",),
        producer_module="layer.conv",
        producer_exclusive=True,
    )
    return dataclasses.replace(base, **overrides)


def fires(code: str, s: Site, ctx: Context | None = None) -> bool:
    ctx = ctx or Context()
    result = RULES[code].check(s, ctx)
    assert isinstance(result, (Finding, Skip))
    if isinstance(result, Finding):
        assert result.code == code
        assert result.severity is RULES[code].severity
        assert s.name in result.message
    return isinstance(result, Finding)


CASES = [
    # code, site overrides, context, expected
    ("NS101", {"call_count": 4, "input_shape": (8, 64)}, Context(), True),
    ("NS101", {}, Context(), False),
    (
        "NS101",
        {"call_count": 2, "kind": "functional", "flavour": "F.batch_norm"},
        Context(),
        True,
    ),  # shared by two branches
    (
        "NS102",
        {"flavour": "BatchNorm1d", "input_shape": (8, 64, 100), "order": "conv (Conv1d, kernel 3)"},
        Context(),
        True,
    ),
    ("NS102", {"flavour": "BatchNorm1d", "input_shape": (8, 64, 100)}, Context(), False),  # a point set: no order
    ("NS102", {"flavour": "BatchNorm1d", "input_shape": (8, 64, 100)}, Context(sequence=True), True),  # said so
    ("NS102", {"flavour": "BatchNorm1d", "input_shape": (8, 64)}, Context(), False),
    (
        "NS102",
        {"flavour": "BatchNorm1d", "input_shape": (8, 64, 100), "call_count": 3},
        Context(),
        False,
    ),  # NS101 covers it
    ("NS103", {}, Context(batch_size=2), True),
    ("NS103", {"input_shape": (2, 64), "call_count": 4, "chunk_sizes": (2, 2, 2, 2)}, Context(batch_size=64), True),
    ("NS103", {"input_shape": (32, 64), "call_count": 2, "chunk_sizes": (32, 32)}, Context(batch_size=64), False),
    ("NS103", {}, Context(batch_size=64), False),
    ("NS103", {}, Context(batch_size=2, inference_only=True), False),
    ("NS103", {}, Context(batch_size=15), True),  # just below the default threshold
    ("NS103", {}, Context(batch_size=16), False),  # the threshold itself is not small
    ("NS103", {}, Context(batch_size=4, small_batch_threshold=4), False),
    ("NS104", {"input_shape": (8, 64)}, Context(batch_size=1), True),
    ("NS104", {"input_shape": (8, 64)}, Context(batch_size=2), False),  # two values per channel: runs
    ("NS104", {}, Context(batch_size=1), False),  # 14x14 values per channel: runs
    ("NS104", {"input_shape": (8, 64, 1, 1)}, Context(batch_size=1), True),  # pooled map: one value per channel
    (
        "NS104",
        {"input_shape": (16, 64), "rows_per_sample": 8},
        Context(batch_size=1),
        False,
    ),  # (T*N, C): 8 steps per sample
    ("NS104", {"input_shape": (2, 64), "rows_per_sample": 1}, Context(batch_size=1), True),  # dim 0 is the batch
    ("NS103", {"input_shape": (16, 64), "rows_per_sample": 8}, Context(batch_size=2), True),  # 16 rows, from 2 samples
    ("NS105", {}, Context(world_size=8), True),
    ("NS105", {}, Context(world_size=1), False),
    ("NS105", {"flavour": "SyncBatchNorm"}, Context(world_size=8), False),
    (
        "NS105",
        {"kind": "subclass", "flavour": "SyncBatchNormAct", "torch_base": "SyncBatchNorm"},
        Context(world_size=8),
        False,
    ),  # timm's synchronized subclass
    ("NS106", {}, Context(differential_privacy=True), True),
    ("NS106", {}, Context(), False),
    ("NS106", {"batch_dependent_train": False}, Context(differential_privacy=True), False),
    ("NS107", {"track_running_stats": False, "batch_dependent_eval": True}, Context(), True),
    ("NS107", {}, Context(), False),
    ("NS107", {"kind": "functional", "batch_dependent_eval": True}, Context(inference_only=True), True),
    ("NS108", {}, Context(federated=True), True),
    ("NS108", {}, Context(), False),
    ("NS108", {}, Context(federated=True, inference_only=True), False),  # served: no client trains it
    ("NS108", {"kind": "functional", "flavour": "F.batch_norm", "name": "batch_norm"}, Context(federated=True), True),
    ("NS108", {"batch_dependent_train": False}, Context(federated=True), False),  # a frozen BatchNorm: fixed statistics
    ("NS201", {"kind": "functional", "flavour": "F.batch_norm", "name": "batch_norm"}, Context(), True),
    ("NS201", {}, Context(), False),
    (
        "NS201",
        {"kind": "functional", "flavour": "F.batch_norm", "name": "batch_norm_3", "owner": "block"},
        Context(),
        True,
    ),
    ("NS202", {"kind": "subclass", "flavour": "BatchNormAct2d", "overrides_forward": True}, Context(), True),
    ("NS202", {}, Context(), False),
    ("NS202", {"kind": "subclass", "flavour": "MyBN", "overrides_forward": False}, Context(), False),  # adds nothing
    (
        "NS202",
        {"kind": "subclass", "flavour": "NaiveSyncBatchNorm", "overrides_forward": True, "normalizes_by_hand": True},
        Context(),
        True,
    ),
    (
        "NS203",
        {"input_shape": (8, 16, 1, 1), "num_features": 16},
        Context(),
        True,
    ),  # GroupNorm(16, 16) on one value per channel
    ("NS203", {"input_shape": (8, 16), "num_features": 16}, Context(), False),  # (N, C) features: LayerNorm, no groups
    ("NS203", {}, Context(), False),
    ("NS203", {"input_shape": (8, 64, 1, 1)}, Context(), False),  # 64 / 32 = 2 values per group
    (
        "NS203",
        {"input_shape": (8, 16, 1, 1), "num_features": 16},
        Context(inference_only=True),
        False,
    ),  # folded, no groups
    ("NS204", {"momentum": 0.997}, Context(), True),  # a TensorFlow decay
    ("NS204", {}, Context(), False),  # torch's default 0.1
    ("NS204", {"momentum": 0.5}, Context(), False),  # the threshold itself does not fire
    ("NS204", {"momentum": 0.99}, Context(inference_only=True), False),  # statistics are not updated
    ("NS204", {"momentum": None}, Context(), False),  # cumulative average
    ("NS205", {"call_count": 0, "input_shape": None}, Context(), True),
    ("NS205", {}, Context(), False),
    (
        "NS205",
        {"call_count": 0, "input_shape": None, "flavour": "BatchNorm1d"},
        Context(inference_only=True),
        True,
    ),  # frozen, still said
    ("NS301", {}, Context(inference_only=True), True),
    (
        "NS301",
        {"producer_weights_problem": "whose weight is shared with head.weight (tied weights)"},
        Context(inference_only=True),
        False,
    ),
    ("NS301", {}, Context(), False),
    ("NS301", {"producers": ("add",), "producer_module": None}, Context(inference_only=True), False),
    (
        "NS301",
        {"producer_exclusive": False},
        Context(inference_only=True),
        False,
    ),  # the conv output is also used elsewhere
    ("NS302", {}, Context(finetune=True, batch_size=4), True),
    ("NS302", {}, Context(finetune=True, batch_size=256), False),
    ("NS302", {}, Context(finetune=True, batch_size=15), True),  # just below the threshold
    ("NS302", {}, Context(finetune=True, batch_size=16), False),  # the threshold itself
    (
        "NS302",
        {"track_running_stats": False, "batch_dependent_eval": True},
        Context(finetune=True, batch_size=4),
        False,
    ),
]


@pytest.mark.parametrize("code,overrides,ctx,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rule(code: str, overrides: dict, ctx: Context, expected: bool) -> None:
    assert fires(code, site(**overrides), ctx) is expected


def test_not_traceable_fires_only_for_fallback_captures() -> None:
    rule = RULES["NS901"]
    assert rule.check_model(Capture("fx", []), Context()) == []
    (finding,) = rule.check_model(Capture("hooks", [], fallback_reasons=["fx: TraceError: control flow"]), Context())
    assert "TraceError" in finding.message and "hooks" in finding.message
    (finding,) = rule.check_model(Capture("export", []), Context())  # edge: no recorded reason
    assert "export" in finding.message


def test_catalogue_is_complete_and_documented() -> None:
    codes = [r.code for r in CATALOGUE]
    assert codes == sorted(codes) and len(set(codes)) == len(codes) == 16
    for rule in CATALOGUE:
        doc = rule.documentation()
        for heading in ("## What it does", "## Why is this bad?", "## Example", "## Fix safety", "## References"):
            assert heading in doc, (rule.code, heading)
        assert isinstance(rule.severity, Severity)
    assert "34.7%" in RULES["NS103"].documentation()  # the GroupNorm paper's batch-size figure


def test_reuse_fix_depends_on_the_data() -> None:
    recurrent = RULES["NS101"].check(site(call_count=4, input_shape=(8, 64)), Context())
    shared_maps = RULES["NS101"].check(site(call_count=2), Context())
    assert (recurrent.remedy.target, shared_maps.remedy.target) == ("layernorm", "groupnorm")


def test_ghost_batches_are_chunks_of_one_step_not_recurrence() -> None:
    """TabNet's GBN: one BatchNorm1d called on 2 chunks of a batch of 4. NS101 says chunks of one
    step (not time steps) and proposes the replacement for one call on (N, C) features; NS103
    counts the chunk, not the batch; four calls on full batches stay recurrence."""
    from normswap import policy

    ghost = site(call_count=2, input_shape=(2, 16), chunk_sizes=(2, 2))
    finding = RULES["NS101"].check(ghost, Context())
    assert isinstance(finding, Finding) and finding.message == (
        "'layer.bn' normalizes the batch in 2 chunks of 2 sample(s) (ghost batch norm): each chunk by its own "
        "statistics, with the running statistics shared across the chunks of one step, not across time steps."
    )
    assert policy.natural_target(ghost, Context()) == (
        "layernorm",
        "(N, C) features: LayerNorm over the features of each sample",
    )
    small = RULES["NS103"].check(ghost, Context(batch_size=4))
    assert isinstance(small, Finding) and "from chunks of 2 sample(s), one call per chunk of the batch" in small.message
    steps = RULES["NS101"].check(site(call_count=4, input_shape=(8, 16)), Context())
    assert "applied 4 times per forward pass" in steps.message
    assert "recurrence" in policy.natural_target(site(call_count=4, input_shape=(8, 16)), Context())[1]


@pytest.mark.parametrize(
    ("shapes", "batch", "expected"),
    [
        ([(2, 6), (2, 6)], 4, (2, 2)),  # x.chunk(2) of a batch of 4
        ([(3, 6), (2, 6)], 5, (3, 2)),  # an uneven last chunk
        ([(2, 6), (2, 6), (2, 6), (2, 6)], 4, (2, 2, 2, 2)),  # chunked at each of two steps
        ([(4, 6), (4, 6)], 4, ()),  # full batches: recurrence, not chunks
        ([(2, 6), (2, 8)], 4, ()),  # different layers' shapes
        ([(2, 6)], 4, ()),  # one call
        ([(3, 6), (2, 6)], 4, ()),  # does not add up to whole batches
    ],
    ids=["chunk-2", "uneven", "two-steps", "full-batches", "other-shapes", "one-call", "not-whole"],
)
def test_chunk_sizes_read_off_each_calls_shape(shapes: list, batch: int, expected: tuple) -> None:
    from normswap.sites import chunk_sizes

    assert chunk_sizes(shapes, batch) == expected


def test_fix_safety_is_stated() -> None:
    frozen = RULES["NS302"].check(site(), Context(finetune=True, batch_size=2))
    assert frozen.remedy.target == "frozen" and frozen.remedy.safe
    swap = RULES["NS106"].check(site(), Context(differential_privacy=True))
    assert swap.remedy.target == "groupnorm" and not swap.remedy.safe


def test_federated_clients_get_groupnorm_or_fedbn() -> None:
    finding = RULES["NS108"].check(site(), Context(federated=True))
    assert isinstance(finding, Finding) and finding.remedy.target == "groupnorm" and not finding.remedy.safe
    assert "FedBN: keep its state on each client" in finding.remedy.description
    assert "normswap.federated.local_state" in finding.message
    features = RULES["NS108"].check(site(input_shape=(8, 64), flavour="BatchNorm1d"), Context(federated=True))
    assert isinstance(features, Finding) and features.remedy.target == "layernorm"
    documentation = RULES["NS108"].documentation()
    assert "FedBN" in documentation and "Non-IID Data Quagmire" in documentation and "PFLlib#260" in documentation


def test_sequence_context_reads_rank3_inputs_as_time_steps() -> None:
    from normswap import policy

    sync = site(flavour="SyncBatchNorm", input_shape=(8, 64, 100))
    assert policy.natural_target(sync, Context())[0] == "groupnorm"  # a 1-D feature map, as far as anyone knows
    assert policy.natural_target(sync, Context(sequence=True))[0] == "layernorm"  # --sequence: per time step
    assert not fires("NS102", sync)
    finding = RULES["NS102"].check(sync, Context(sequence=True))
    assert isinstance(finding, Finding) and "padded steps" in finding.message and finding.remedy.target == "layernorm"


@pytest.mark.parametrize(
    "overrides,ctx,expected",
    [
        (
            {"feeds_from_input": True},
            Context(differential_privacy=True),
            "frozen",
        ),  # input standardization, DP included
        ({"feeds_from_input": True}, Context(batch_size=2, world_size=8), "frozen"),
        (
            {"feeds_from_input": True, "track_running_stats": False, "batch_dependent_eval": True},
            Context(),
            "groupnorm",
        ),
        ({}, Context(inference_only=True), "fold"),
        ({"producer_module": None}, Context(inference_only=True), "frozen"),
        ({}, Context(finetune=True, batch_size=2), "frozen"),
        ({}, Context(finetune=True, batch_size=64), "groupnorm"),
        ({"input_shape": (8, 64)}, Context(), "layernorm"),
        ({"call_count": 4, "input_shape": (8, 64)}, Context(), "layernorm"),
    ],
    ids=[
        "input-dp",
        "input-small-batch",
        "input-no-stats",
        "inference-fold",
        "inference-frozen",
        "finetune-small",
        "finetune-large",
        "features",
        "recurrence",
    ],
)
def test_natural_target_in_context(overrides: dict, ctx: Context, expected: str) -> None:
    from normswap import policy

    assert policy.natural_target(site(**overrides), ctx)[0] == expected


def test_every_fix_is_the_natural_target() -> None:
    # a finding never replaces the site's natural target with a worse one: they are the same
    from normswap import policy

    s = site(feeds_from_input=True)
    for ctx in (Context(batch_size=2), Context(differential_privacy=True), Context(world_size=4)):
        for rule in CATALOGUE:
            result = rule.check(s, ctx)
            if isinstance(result, Finding) and result.remedy is not None:
                assert result.remedy.target == policy.natural_target(s, ctx)[0] == "frozen", (rule.code, ctx)


class _Tagger(torch.nn.Module):
    """BatchNorm1d over (N, C, L) steps that an LSTM then reads: the order shows downstream only."""

    def __init__(self, pooled: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Conv1d(6, 6, 1)  # kernel 1: no evidence of order, and not the raw input
        self.norm = torch.nn.BatchNorm1d(6)
        self.lstm = torch.nn.LSTM(6, 8, batch_first=True)
        self.pooled = pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm(self.embed(x)))
        if self.pooled:  # L reduced away first: what reaches the LSTM says nothing about it
            y = y.amax(-1, keepdim=True).expand(-1, -1, 5).contiguous().sum(-1, keepdim=True).expand(-1, -1, 5)
        return self.lstm(y.transpose(1, 2))[0][:, -1]


def test_a_recurrent_layer_reading_the_output_is_evidence_of_order() -> None:
    import normswap

    x = torch.randn(4, 6, 5)
    report = normswap.lint(_Tagger(), x, Context(batch_size=4))
    found = {f.site_name: f.message for f in report.findings if f.code == "NS102"}
    assert "(its steps are ordered: it feeds lstm (LSTM, recurrent))" in found["norm"]
    assert {e.name: e.target for e in report.lint.plan}["norm"] == "layernorm"
    far = normswap.lint(_Tagger(pooled=True), x, Context(batch_size=4))  # beyond four operations
    assert not [f for f in far.findings if f.code == "NS102"]
