"""Which ONNX formulation of each replacement runs fastest in onnxruntime (CPU, 2 threads)?

GroupNorm: the exporter's own form (Reshape -> InstanceNormalization -> Reshape -> Mul -> Add),
LayerNormalization over a (N, G, C/G*H*W) view (normswap's choice), a ReduceMean formulation, InstanceNormalization
with the affine fused when G == C, and opset 21's GroupNormalization. Channel LayerNorm:
Transpose -> LayerNormalization -> Transpose (default) vs ReduceMean over the channel axis.
Also counts the sites whose affine could fold into a following conv / linear (nothing non-linear
in between). Every variant is checked against F.group_norm / the default before it is timed.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import normswap
from nets import MobileNetV2, ResNet50, trained_statistics
from normswap.targets import groupnorm as gn_target
from normswap.targets import layernorm as norms

NORMSWAP_GN = gn_target.GroupNorm.forward  # LayerNormalization over a (N, G, -1) view at export


def exporter_default_gn(m, x):
    return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)  # Reshape -> InstanceNormalization -> ...


DEFAULT_LN = norms.channel_layer_norm


def _affine(y, m):
    return y * m.weight.reshape(1, -1, 1, 1) + m.bias.reshape(1, -1, 1, 1)


def gn_reduce_mean(m, x):
    v = x.reshape(x.shape[0], m.num_groups, -1)
    d = v - v.mean(-1, keepdim=True)
    return _affine((d * torch.rsqrt((d * d).mean(-1, keepdim=True) + m.eps)).reshape(x.shape), m)


def gn_instance_when_g_equals_c(m, x):
    if m.num_groups == m.num_channels:
        return F.instance_norm(x, weight=m.weight, bias=m.bias, eps=m.eps)
    return exporter_default_gn(m, x)


def ln_reduce_mean(x, weight, bias, eps, num_channels=None):
    if x.dim() == 2:
        return DEFAULT_LN(x, weight, bias, eps, num_channels)
    d = x - x.mean(1, keepdim=True)
    y = d * torch.rsqrt((d * d).mean(1, keepdim=True) + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return y * weight.reshape(shape) + bias.reshape(shape) if weight is not None else y


def foldable_sites(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(sites whose only consumers are conv / linear, all sites) in the symbolic graph."""
    from normswap.capture import trace

    graph_module = trace(model)
    modules = dict(graph_module.named_modules())
    sites = [
        n
        for n in graph_module.graph.nodes
        if n.op == "call_module" and isinstance(modules[n.target], nn.modules.batchnorm._BatchNorm)
    ]
    linear = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    foldable = sum(
        1
        for n in sites
        if n.users and all(u.op == "call_module" and isinstance(modules[u.target], linear) for u in n.users)
    )
    return foldable, len(sites)


def interleaved_latency(paths: dict[str, Path], batch: int, rounds: int, runs: int) -> dict[str, float]:
    """Median latency per file, timing the files in alternating rounds so that drift in the
    machine's speed hits every variant alike (separate runs differ by +-15% on 2 cores)."""
    sessions = {}
    for label, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        sessions[label] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, {session.get_inputs()[0].name: feed})
    for _ in range(rounds):
        for label, session in sessions.items():
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, {session.get_inputs()[0].name: feed})
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> None:
    x = torch.randn(2, 3, 224, 224)
    folder = Path(tempfile.mkdtemp())
    for name, build in (("mobilenet_v2", MobileNetV2), ("resnet50", ResNet50)):
        model = trained_statistics(build(), (4, 3, 224, 224))
        foldable, total = foldable_sites(model, x)
        print(f"{name}: {foldable} of {total} BatchNorm sites feed only conv/linear (affine foldable)")
        paths = {"BatchNorm original": normswap.export_onnx(model, x, folder / f"{name}-bn.onnx")}
        notes = {"BatchNorm original": ""}
        gn = normswap.convert(model, x, to="groupnorm").model
        ln = normswap.convert(model, x, to="layernorm").model
        with torch.no_grad():
            reference_gn, reference_ln = gn(x), ln(x)
        variants = [
            ("groupnorm: exporter's (InstanceNorm)", gn, reference_gn, exporter_default_gn, DEFAULT_LN, None),
            ("groupnorm: LayerNorm view (normswap)", gn, reference_gn, NORMSWAP_GN, DEFAULT_LN, None),
            ("groupnorm: ReduceMean", gn, reference_gn, gn_reduce_mean, DEFAULT_LN, None),
            ("groupnorm: InstanceNorm if G == C", gn, reference_gn, gn_instance_when_g_equals_c, DEFAULT_LN, None),
            ("groupnorm: opset 21 GroupNormalization", gn, reference_gn, NORMSWAP_GN, DEFAULT_LN, 21),
            ("layernorm: Transpose (normswap)", ln, reference_ln, NORMSWAP_GN, DEFAULT_LN, None),
            ("layernorm: ReduceMean", ln, reference_ln, NORMSWAP_GN, ln_reduce_mean, None),
        ]
        for index, (label, converted, reference, gn_forward, ln_function, opset) in enumerate(variants):
            gn_target.GroupNorm.forward, norms.channel_layer_norm = gn_forward, ln_function
            try:
                with torch.no_grad():
                    error = float((converted(x) - reference).abs().max())
                path = normswap.export_onnx(converted, x, folder / f"{name}-{index}.onnx", opset=opset)
                validation = normswap.validate_onnx(converted, path, x)
            finally:
                gn_target.GroupNorm.forward, norms.channel_layer_norm = NORMSWAP_GN, DEFAULT_LN
            ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
            norm_ops = "+".join(
                op
                for op in ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "ReduceMean")
                if ops.get(op)
            )
            paths[label] = path
            notes[label] = (
                f"|torch diff| {error:.1e}, onnxruntime {'ok' if validation.fidelity_passed else 'WRONG'}, {norm_ops}"
            )
        timing = {
            1: interleaved_latency(paths, 1, rounds=8, runs=8),
            8: interleaved_latency(paths, 8, rounds=3, runs=3),
        }
        for label in paths:
            t1, t8 = timing[1][label], timing[8][label]
            b1, b8 = timing[1]["BatchNorm original"], timing[8]["BatchNorm original"]
            print(
                f"  {label:<40} b1 {t1 * 1000:7.2f} ms x{t1 / b1:.2f}   b8 {t8 * 1000:7.2f} ms x{t8 / b8:.2f}   {notes[label]}"
            )


if __name__ == "__main__":
    main()
