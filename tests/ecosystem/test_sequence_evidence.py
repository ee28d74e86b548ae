"""What lint believes about rank-3 inputs, on the real libraries: wav2vec2-conformer's
BatchNorm1d over (N, C, T) follows a depthwise Conv1d whose kernel spans several steps (evidence
of order, read here without a graph: NS102, LayerNorm per step), and torchvision's ResNet has no
rank-3 input to misread."""

from __future__ import annotations

from zoo import build, example

import normswap


def test_the_conformer_batchnorm_follows_a_wide_kernel_and_reads_as_a_sequence() -> None:
    name = "transformers/wav2vec2_conformer"
    model = build(name)
    kernel = model.config.conv_depthwise_kernel_size
    assert kernel > 1
    report = normswap.lint(model, example(name), normswap.Context(batch_size=2))
    sequences = [s for s in report.sites if s.input_rank == 3]
    assert sequences and all(f"depthwise_conv (Conv1d, kernel {kernel})" in s.order for s in sequences)
    messages = {f.site_name: f.message for f in report.findings if f.code == "NS102"}
    assert set(messages) == {s.name for s in sequences}
    assert all("its steps are ordered: it follows" in m and "depthwise_conv" in m for m in messages.values())
    assert {e.target for e in report.lint.plan if e.name in messages} == {"layernorm"}


def test_torchvision_resnet_has_no_sequence_to_misread() -> None:
    name = "torchvision/resnet18"
    report = normswap.lint(build(name), example(name), normswap.Context(batch_size=2))
    assert [f for f in report.findings if f.code in ("NS101", "NS102")] == []
    assert {e.target for e in report.lint.plan} == {"groupnorm"}
