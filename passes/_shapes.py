"""Read-only shape facts for matching: static dims and small integer constant expressions.

The fold pass needs two facts that models often leave implicit: the static size of a channel
axis, and the values of Slice bounds that exporters compute at run time from ``Shape`` (what
``torch.onnx.export(dynamo=False)`` writes for ``torch.chunk``). Both are answered here without
modifying the model: shape inference runs on a serialised copy whose large weights are replaced
by shape-only placeholders.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

_PLACEHOLDER_BYTES = 1024
# Integer constants are copied into Python-object arrays to be evaluated, ~40x their size in
# int64. Shape arithmetic, Slice bounds and Split sizes (one entry per part: thousands at most)
# stay far below this bound; it only keeps a large integer table (an embedding's index
# initializer, say) from being copied whole.
_MAX_CONSTANT_ELEMENTS = 1 << 16
_UNKNOWN = None


class ShapeFacts:
    """Lazily inferred shapes and constant folding of shape arithmetic.

    Args:
        model: The model to read (never modified).
        input_shapes: Concrete shapes for graph inputs whose dims are symbolic, used by shape
            inference in their place.
    """

    def __init__(
        self, model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None
    ) -> None:
        self._model = model
        self._input_shapes = dict(input_shapes or {})
        self._inferred: dict[str, onnx.TypeProto] | None = None
        self._const_cache: dict[int, np.ndarray | None] = {}

    def shape(self, value: ir.Value) -> ir.Shape | None:
        if value.shape is not None and all(isinstance(d, int) for d in value.shape):
            return value.shape
        type_proto = self._inferred_types().get(value.name or "")
        inferred = _shape_from_type(type_proto) if type_proto is not None else None
        if inferred is not None:
            return inferred
        return value.shape

    def static_dim(self, value: ir.Value, axis: int) -> int | None:
        shape = self.shape(value)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        dim = shape[axis]
        return dim if isinstance(dim, int) else None

    def rank(self, value: ir.Value) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def _inferred_types(self) -> dict[str, onnx.TypeProto]:
        if self._inferred is None:
            self._inferred = _infer(self._model, self._input_shapes)
        return self._inferred

    def int_values(self, value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
        """The integer contents of ``value`` if they can be proven statically, else None."""
        if value is None:
            return None
        key = id(value)
        if key in self._const_cache:
            return self._const_cache[key]
        result = self._eval(value, depth)
        if result is not None and any(v is _UNKNOWN for v in result.flat):
            result = None
        if result is not None:
            result = result.astype(np.int64)
        self._const_cache[key] = result
        return result

    def _partial(self, value: ir.Value | None, depth: int) -> np.ndarray | None:
        """Like int_values, but Shape() results may hold unknown (None) entries."""
        if value is None or depth > 32:
            return None
        return self._eval(value, depth + 1)

    def _eval(self, value: ir.Value, depth: int) -> np.ndarray | None:
        """The value's contents as an object array (None entries unknown), or None.

        Never raises: any input the folders do not expect (a malformed model, an op form
        not handled) means "unknown", and matching then refuses with its own reason.
        """
        try:
            result = self._eval_value(value, depth)
        except Exception as exc:  # noqa: BLE001 - see the docstring: unknown, never a crash
            logger.debug("cannot evaluate '%s': %s: %s", value.name, type(exc).__name__, exc)
            return None
        # Folders may return scalars (np.take with a 0-d index gives an element, not an array).
        return None if result is None else np.asarray(result, dtype=object)

    def _eval_value(self, value: ir.Value, depth: int) -> np.ndarray | None:
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is not None:
            integral = tensor.dtype is not None and (
                tensor.dtype.is_integer() or tensor.dtype == ir.DataType.BOOL
            )
            if not integral:
                return None
            if tensor.size > _MAX_CONSTANT_ELEMENTS:
                return None
            return tensor.numpy().astype(object)
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op not in _FOLDERS:
            return None
        inputs = [self._partial(v, depth) if v is not None else None for v in node.inputs]
        return _FOLDERS[op](self, node, inputs)


def _fold_shape(facts: ShapeFacts, node: ir.Node, _inputs) -> np.ndarray | None:
    shape = facts.shape(node.inputs[0])
    if shape is None:
        return None
    dims = [d if isinstance(d, int) else _UNKNOWN for d in shape]
    start = node.attributes.get("start")
    end = node.attributes.get("end")
    lo = start.as_int() if start is not None else 0
    hi = end.as_int() if end is not None else len(dims)
    return np.array(dims[slice(lo, hi)], dtype=object)


def _elementwise(fn):
    def fold(_facts, _node, inputs):
        a, b = inputs[0], inputs[1]
        if a is None or b is None:
            return None
        a, b = np.broadcast_arrays(a, b)
        out = np.empty(a.shape, dtype=object)
        for idx in np.ndindex(a.shape):
            x, y = a[idx], b[idx]
            out[idx] = _UNKNOWN if x is _UNKNOWN or y is _UNKNOWN else fn(int(x), int(y))
        return out

    return fold


def _trunc_div(x: int, y: int) -> int:
    # ONNX integer Div truncates toward zero.
    q = abs(x) // abs(y)
    return q if (x >= 0) == (y >= 0) else -q


def _fold_gather(_facts, node, inputs):
    data, indices = inputs
    if data is None or indices is None or any(i is _UNKNOWN for i in indices.flat):
        return None
    axis = node.attributes.get("axis")
    axis = axis.as_int() if axis is not None else 0
    return np.take(data, indices.astype(np.int64), axis=axis)


def _fold_unsqueeze(_facts, node, inputs):
    data = inputs[0]
    if data is None:
        return None
    axes = node.attributes.get("axes")
    axes = list(axes.as_ints()) if axes is not None else inputs[1]
    if axes is None:
        return None
    out = data
    rank = data.ndim + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        out = np.expand_dims(out, axis)
    return out


def _axis(axis, rank: int) -> int:
    """``axis`` in [0, rank), from ONNX's [-rank, rank); ValueError (unknown) outside it."""
    axis = int(axis)
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} outside rank {rank}")
    return axis + rank if axis < 0 else axis


def _fold_squeeze(_facts, node, inputs):
    data = inputs[0]
    if data is None:
        return None
    axes = node.attributes.get("axes")
    axes = list(axes.as_ints()) if axes is not None else (inputs[1] if len(inputs) > 1 else None)
    if axes is None:
        return np.squeeze(data)
    return np.squeeze(data, axis=tuple(_axis(a, data.ndim) for a in axes))


def _fold_concat(_facts, node, inputs):
    if any(i is None for i in inputs):
        return None
    return np.concatenate([np.atleast_1d(i) for i in inputs], axis=node.attributes["axis"].as_int())


def _fold_identity(_facts, _node, inputs):
    return inputs[0]


def _fold_reshape(_facts, _node, inputs):
    data, shape = inputs[0], inputs[1]
    if data is None or shape is None or any(s is _UNKNOWN for s in shape.flat):
        return None
    return data.reshape([int(s) for s in shape.flat])


def _fold_slice(_facts, _node, inputs):
    data = inputs[0]
    if data is None or data.ndim != 1:
        return None
    starts, ends = inputs[1], inputs[2]
    steps = inputs[4] if len(inputs) > 4 and inputs[4] is not None else np.array([1], dtype=object)
    if starts is None or ends is None:
        return None
    if len(inputs) > 3 and inputs[3] is not None and [_axis(a, 1) for a in inputs[3].flat] != [0]:
        return None
    return data[slice(int(starts[0]), int(min(ends[0], 2**62)), int(steps[0]))]


_FOLDERS = {
    "Shape": _fold_shape,
    "Gather": _fold_gather,
    "Unsqueeze": _fold_unsqueeze,
    "Squeeze": _fold_squeeze,
    "Concat": _fold_concat,
    "Identity": _fold_identity,
    "Cast": _fold_identity,
    "Reshape": _fold_reshape,
    "Slice": _fold_slice,
    "Add": _elementwise(lambda x, y: x + y),
    "Sub": _elementwise(lambda x, y: x - y),
    "Mul": _elementwise(lambda x, y: x * y),
    "Div": _elementwise(_trunc_div),
    "Max": _elementwise(max),
    "Min": _elementwise(min),
}


def _infer(model: ir.Model, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, onnx.TypeProto]:
    """Run onnx shape inference on a copy; map value name -> inferred type (all graphs)."""
    saved: list[tuple[ir.Value, object]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is not None and tensor.nbytes > _PLACEHOLDER_BYTES:
                    saved.append((value, tensor))
                    value.const_value = ir.ExternalTensor(
                        "__shape_only__", 0, tensor.nbytes, tensor.dtype,
                        shape=tensor.shape, name=value.name,
                    )  # fmt: skip
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in saved:
            value.const_value = tensor
    for value in proto.graph.input:
        if value.name in input_shapes and value.type.HasField("tensor_type"):
            shape = value.type.tensor_type.shape
            shape.Clear()
            for size in input_shapes[value.name]:
                shape.dim.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # inference is best effort: matching then refuses what it can't see
        logger.debug("shape inference failed: %s", exc)
        return {}
    # Names are unique across a graph and its subgraphs (no shadowing in ONNX), so one table serves.
    types: dict[str, onnx.TypeProto] = {}
    pending = [inferred.graph]
    while pending:
        graph = pending.pop()
        for info in (*graph.value_info, *graph.output, *graph.input):
            types.setdefault(info.name, info.type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    pending.append(attr.g)
                pending.extend(attr.graphs)
    return types


def _shape_from_type(type_proto: onnx.TypeProto) -> ir.Shape | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for dim in type_proto.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or None)
    return ir.Shape(dims)
