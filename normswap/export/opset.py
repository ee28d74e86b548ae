"""An exported ONNX model brought down to the opset the user asked for, op by op, with lowerings
that keep the function; an op without one is named in an ExportError.

torch.onnx's dynamo exporter builds opset 18 and tries to convert to the opset asked for; where
that fails it keeps 18 and says so only in a log. Each op whose definition changed between the
two opsets is lowered here: the reductions (axes input -> attribute), LayerNormalization (opset
17) into ReduceMean / Sub / Mul / Sqrt, Shape's start / end (15) into a Slice, Mish (18), CastLike
(15), Split's num_outputs (18), and ops whose newer definition only adds types or optional
arguments the graph does not use.
"""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExportError

_REDUCTIONS_WITH_AXES_INPUT = frozenset(
    {
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)  # axes moved from an attribute to an input at opset 18
# newer definitions that only add types (bfloat16, optional / sequence types)
_TYPES_ONLY = frozenset(
    {
        "BatchNormalization",
        "Pow",
        "Where",
        "LeakyRelu",
        "PRelu",
        "GreaterOrEqual",
        "LessOrEqual",
        "Identity",
        "If",
        "Loop",
        "Scan",
    }
)
_NEW_TYPES = frozenset({TensorProto.BFLOAT16})
_INT64_MAX = np.iinfo(np.int64).max


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default (ai.onnx) domain the model imports."""
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def lower(model: onnx.ModelProto, opset: int) -> list[str]:
    """Rewrite `model` (in place) to import the default domain at `opset`, lower than its own.

    Returns:
        One line per op type lowered ("LayerNormalization x2 -> ReduceMean, Sub, ...").

    Raises:
        ExportError: an op that has no definition at `opset`, or one whose definition changed in
            a way the graph uses, with no lowering here (the sentence names it).
    """
    current = default_opset(model)
    if current is None or current <= opset:
        return []
    if model.functions:
        raise ExportError(
            f"The exported model holds ONNX functions, whose bodies normswap does not lower to opset {opset}; the file "
            f"would really be opset {current}: export with --opset {current}."
        )
    inferred = onnx.shape_inference.infer_shapes(model)
    types = _value_types(inferred)
    lowered: dict[str, int] = {}
    for graph in _graphs(model):
        context = _Context(graph, types, current, opset)
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            replacement = _lower_node(node, context)
            if replacement is not None:
                lowered[node.op_type] = lowered.get(node.op_type, 0) + 1
                nodes += replacement
            else:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    for entry in [*model.opset_import, *(e for f in model.functions for e in f.opset_import)]:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    return [f"{op} x{count}" for op, count in sorted(lowered.items())]


@dataclass
class _Context:
    graph: onnx.GraphProto
    types: dict[str, onnx.TypeProto]
    current: int
    opset: int

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a graph input that is a constant (an initializer or a Constant node)."""
        for initializer in self.graph.initializer:
            if initializer.name == name:
                return numpy_helper.to_array(initializer)
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                attribute = next((a for a in node.attribute if a.name == "value"), None)
                return numpy_helper.to_array(attribute.t) if attribute is not None else None
        return None

    def add_constant(self, value: np.ndarray, stem: str) -> str:
        name = self.fresh(stem)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def fresh(self, stem: str) -> str:
        return f"normswap_opset_{stem}_{next(_NAMES)}"

    def element_type(self, name: str) -> int | None:
        kind = self.types.get(name)
        return kind.tensor_type.elem_type if kind is not None and kind.HasField("tensor_type") else None

    def rank(self, name: str) -> int | None:
        kind = self.types.get(name)
        if kind is None or not kind.HasField("tensor_type") or not kind.tensor_type.HasField("shape"):
            return None
        return len(kind.tensor_type.shape.dim)

    def dimension(self, name: str, axis: int) -> int | None:
        kind = self.types.get(name)
        rank = self.rank(name)
        if kind is None or rank is None:
            return None
        dim = kind.tensor_type.shape.dim[axis % rank]
        return dim.dim_value if dim.HasField("dim_value") else None


_NAMES = itertools.count()


def _lower_node(node: onnx.NodeProto, context: _Context) -> list[onnx.NodeProto] | None:
    """The nodes that replace `node` at the requested opset, None when it stays as it is."""
    if node.domain not in ("", "ai.onnx"):
        return None
    now = _since(node.op_type, context.current)
    then = _since(node.op_type, context.opset)
    if now == then:
        return None
    lowering = _LOWERINGS.get(node.op_type)
    if lowering is not None:
        return lowering(node, context)
    if node.op_type in _REDUCTIONS_WITH_AXES_INPUT:
        return _reduction(node, context)
    if then is not None and node.op_type in _TYPES_ONLY:
        used = {context.element_type(name) for name in [*node.input, *node.output] if name}
        if not used & _NEW_TYPES:
            return None
    raise _refusal(node, context, "" if then is None else f" (its definition changed at opset {now})")


def _since(op_type: str, opset: int) -> int | None:
    try:
        return int(onnx.defs.get_schema(op_type, opset, "").since_version)
    except onnx.defs.SchemaError:
        return None


def _refusal(node: onnx.NodeProto, context: _Context, why: str) -> ExportError:
    exists = _since(node.op_type, context.opset) is not None
    what = f"a {node.op_type} op{why}" if exists else f"a {node.op_type} op, which opset {context.opset} does not have"
    return ExportError(
        f"The exported graph holds {what} (node '{node.name or node.output[0]}'), which normswap cannot lower to opset "
        f"{context.opset}; the file would really be opset {context.current}: export with --opset {context.current} "
        "(or newer), or change that part of the model."
    )


def _attributes(node: onnx.NodeProto, drop: tuple[str, ...] = ()) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in drop}


def _reduction(node: onnx.NodeProto, context: _Context) -> list[onnx.NodeProto]:
    """Reduce*-18 (axes as an input) -> Reduce*-13 (axes as an attribute), when the axes are constant."""
    attributes = _attributes(node, drop=("noop_with_empty_axes",))
    axes_name = node.input[1] if len(node.input) > 1 else ""
    noop = bool(_attributes(node).get("noop_with_empty_axes", 0))
    axes = context.constant(axes_name) if axes_name else np.array([], dtype=np.int64)
    if axes is None:
        raise _refusal(node, context, " with axes computed at run time")
    if axes.size:
        attributes["axes"] = [int(a) for a in axes.reshape(-1)]
    elif noop:
        return [helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)]
    return [helper.make_node(node.op_type, [node.input[0]], list(node.output), name=node.name, **attributes)]


def _layer_normalization(node: onnx.NodeProto, context: _Context) -> list[onnx.NodeProto]:
    """LayerNormalization-17 as its definition computes it: mean and variance over the axes from
    `axis` on (in float32 when stash_type is 1), Y = (X - mean) / sqrt(var + epsilon) * Scale + B."""
    attributes = _attributes(node)
    axis, epsilon, stash = (
        int(attributes.get("axis", -1)),
        float(attributes.get("epsilon", 1e-5)),
        attributes.get("stash_type", 1),
    )
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    rank = context.rank(x)
    if axis < 0:
        axes = list(range(axis, 0))
    elif rank is not None:
        axes = list(range(axis - rank, 0))
    else:
        raise _refusal(node, context, " over axes from a positive axis of an input of unknown rank")
    element = context.element_type(x) or TensorProto.FLOAT
    compute = TensorProto.FLOAT if stash == 1 and element in (TensorProto.FLOAT16, TensorProto.BFLOAT16) else element
    if compute not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
        raise _refusal(node, context, f" on elements of type {TensorProto.DataType.Name(element)}")
    name = lambda stem: context.fresh(f"{node.name or 'layer_norm'}_{stem}")  # noqa: E731 - local short-hand
    nodes = []
    source = x
    if compute != element:
        source = name("x")
        nodes.append(helper.make_node("Cast", [x], [source], to=compute))
    outputs = list(node.output) + [""] * (3 - len(node.output))
    mean = outputs[1] or name("mean")
    centred, squared, variance, shifted, deviation = (name(s) for s in ("centred", "squared", "var", "shifted", "std"))
    inverse = outputs[2] or name("inv_std")
    normalized = name("normalized")
    epsilon_value = context.add_constant(np.array(epsilon, dtype=helper.tensor_dtype_to_np_dtype(compute)), "epsilon")
    nodes += [
        helper.make_node("ReduceMean", [source], [mean], axes=axes, keepdims=1),
        helper.make_node("Sub", [source, mean], [centred]),
        helper.make_node("Mul", [centred, centred], [squared]),
        helper.make_node("ReduceMean", [squared], [variance], axes=axes, keepdims=1),
        helper.make_node("Add", [variance, epsilon_value], [shifted]),
        helper.make_node("Sqrt", [shifted], [deviation]),
        helper.make_node("Reciprocal", [deviation], [inverse]),
        helper.make_node("Mul", [centred, inverse], [normalized]),
    ]
    if compute != element:
        back = name("normalized_cast")
        nodes.append(helper.make_node("Cast", [normalized], [back], to=element))
        normalized = back
    scaled = outputs[0] if bias is None else name("scaled")
    nodes.append(helper.make_node("Mul", [normalized, scale], [scaled]))
    if bias is not None:
        nodes.append(helper.make_node("Add", [scaled, bias], [outputs[0]]))
    return nodes


def _shape(node: onnx.NodeProto, context: _Context) -> list[onnx.NodeProto] | None:
    """Shape-15's start / end -> Shape-13 and a Slice of its result."""
    attributes = _attributes(node)
    if "start" not in attributes and "end" not in attributes:
        return [helper.make_node("Shape", list(node.input), list(node.output), name=node.name)]
    whole = context.fresh("shape")
    starts = context.add_constant(np.array([attributes.get("start", 0)], dtype=np.int64), "start")
    ends = context.add_constant(np.array([attributes.get("end", _INT64_MAX)], dtype=np.int64), "end")
    axes = context.add_constant(np.array([0], dtype=np.int64), "axes")
    return [
        helper.make_node("Shape", list(node.input), [whole], name=node.name),
        helper.make_node("Slice", [whole, starts, ends, axes], list(node.output)),
    ]


def _mish(node: onnx.NodeProto, context: _Context) -> list[onnx.NodeProto]:
    """Mish(x) = x * tanh(softplus(x)), its definition."""
    softplus, tanh = context.fresh("softplus"), context.fresh("tanh")
    return [
        helper.make_node("Softplus", [node.input[0]], [softplus]),
        helper.make_node("Tanh", [softplus], [tanh]),
        helper.make_node("Mul", [node.input[0], tanh], list(node.output), name=node.name),
    ]


def _cast_like(node: onnx.NodeProto, context: _Context) -> list[onnx.NodeProto]:
    element = context.element_type(node.input[1])
    if element is None:
        raise _refusal(node, context, " to a type not known before run time")
    return [helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=element)]


def _split(node: onnx.NodeProto, context: _Context) -> list[onnx.NodeProto] | None:
    """Split-18's num_outputs -> Split-13's split sizes, when the split axis has a fixed size."""
    attributes = _attributes(node)
    outputs = attributes.pop("num_outputs", None)
    if outputs is None:
        return None  # sizes given as an input: Split-13 reads them the same way
    size = context.dimension(node.input[0], int(attributes.get("axis", 0)))
    if size is None:
        raise _refusal(node, context, " into num_outputs parts of an axis whose size is known only at run time")
    part = -(-size // outputs)  # Split-18: equal parts, the last one smaller
    sizes = [part] * (size // part) + ([size % part] if size % part else [])
    split = context.add_constant(np.array(sizes, dtype=np.int64), "split")
    return [helper.make_node("Split", [node.input[0], split], list(node.output), name=node.name, **attributes)]


def _unused_new_arguments(
    inputs: int, attributes: tuple[str, ...], defaults: dict[str, object] | None = None
) -> Callable[[onnx.NodeProto, _Context], list[onnx.NodeProto] | None]:
    """A lowering for an op whose newer definition adds optional inputs past `inputs` or the given
    attributes: the node stays when it uses none of them (or only their `defaults`)."""

    def keep(node: onnx.NodeProto, context: _Context) -> None:
        given = _attributes(node)
        used = [name for name in attributes if name in given and (defaults or {}).get(name, object()) != given[name]]
        if any(node.input[inputs:]) or used:
            raise _refusal(node, context, f" using {', '.join(used) or 'an input'} its older definition lacks")
        return None

    return keep


_LOWERINGS: dict[str, Callable[[onnx.NodeProto, _Context], list[onnx.NodeProto] | None]] = {
    "LayerNormalization": _layer_normalization,
    "Shape": _shape,
    "Mish": _mish,
    "CastLike": _cast_like,
    "Split": _split,
    "Pad": _unused_new_arguments(3, ()),
    "ScatterElements": _unused_new_arguments(3, ("reduction",), {"reduction": b"none"}),
    "ScatterND": _unused_new_arguments(3, ("reduction",), {"reduction": b"none"}),
    "Resize": _unused_new_arguments(
        4, ("antialias", "axes", "keep_aspect_ratio_policy"), {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"}
    ),
}


def _graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph (If / Loop / Scan bodies)."""
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        yield graph
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    pending.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    pending.extend(attribute.graphs)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    graph = model.graph
    types = {v.name: v.type for v in [*graph.input, *graph.output, *graph.value_info]}
    for initializer in graph.initializer:
        kind = onnx.TypeProto()
        kind.tensor_type.elem_type = initializer.data_type
        for dim in initializer.dims:
            kind.tensor_type.shape.dim.add().dim_value = dim
        types.setdefault(initializer.name, kind)
    return types


def file_header(path: str) -> tuple[dict[str, int], dict[str, str]]:
    """(version per imported domain, metadata) of an ONNX file, read past its graph without
    parsing it: the file's own opset_import, cheaply at any size.

    Raises:
        ValueError: not a ModelProto's wire format.
    """
    opsets: dict[str, int] = {}
    metadata: dict[str, str] = {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        position = 0
        while position < len(data):
            key, position = _varint(data, position)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, position = _varint(data, position)
            elif wire == 1:
                position += 8
            elif wire == 5:
                position += 4
            elif wire == 2:
                length, position = _varint(data, position)
                if field in (_OPSET_IMPORT, _METADATA_PROPS):
                    payload = bytes(data[position : position + length])
                    if field == _OPSET_IMPORT:
                        entry = onnx.OperatorSetIdProto.FromString(payload)
                        opsets[entry.domain or ""] = entry.version
                    else:
                        prop = onnx.StringStringEntryProto.FromString(payload)
                        metadata[prop.key] = prop.value
                position += length
            else:
                raise ValueError(f"wire type {wire} at byte {position}")
            if position > len(data):
                raise ValueError("truncated")
    return opsets, metadata


_OPSET_IMPORT, _METADATA_PROPS = 8, 14  # ModelProto's field numbers (onnx.proto)


def _varint(data: bytes | mmap.mmap, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data):
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
