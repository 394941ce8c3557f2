"""Quantized constants of the conv passes: read, cut into groups, joined, embedded, rebuilt.

A convolution of a quantized model (what ``onnxruntime.quantization`` writes, and what NPU
toolchains consume) takes its weight and bias as ``DequantizeLinear`` of constant integers
(QDQ form), or as integers plus scale and zero point inputs (``QLinearConv``). Both are read
into one :class:`QuantConst`: the integer values, the scale and zero point, and the axis they
apply along (None: one scale for the whole tensor).

What the passes do with one, exactly (no value is ever requantized):

* rows ``a:b`` of axis 0 (a group's weight, a branch's bias): the values' rows, and the scale
  and zero point rows when they are per-axis on axis 0; otherwise they are shared;
* joining tensors on axis 0 (a fold): values concatenated; per-axis-0 scales concatenated;
  per-tensor scales kept when every part has the same scale and zero point, else repeated into
  per-axis-0 scales (each part's rows keep exactly their own scale); scales per-axis on any
  other axis must be equal in every part;
* a block-diagonal or embedded weight (dense expansion, MixConv): the new positions hold the
  zero point, so they dequantize to exactly 0.

Blocked quantization (``block_size``, opset 21) is cut and joined along axis 0 with its
scales, when the blocks run along another axis, or along axis 0 in whole blocks per group.

Refused with the reason: a ``DequantizeLinear`` whose inputs are not constants, blocks on axis 0
that a group boundary cuts, and blocked weights where new positions would be needed (dense
expansion, MixConv).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ._common import (
    NODE,
    Refusal,
    add_constant,
    attr_int,
    const_array,
    is_onnx_op,
    through_identity,
)
from ._geometry import CONV, block_diagonal_weight


@dataclasses.dataclass
class QuantConst:
    """A quantized constant: ``(values - zero_point) * scale`` along ``axis``."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    """Axis of a per-axis scale; None: one scale for the whole tensor."""
    attributes: dict = dataclasses.field(default_factory=dict)
    """The DequantizeLinear's other attributes (kept on every rebuilt one)."""
    block_size: int = 0
    """Blocked quantization (opset 21): blocks of this many elements along ``axis``, the scale
    and zero point of the values' rank; 0: per tensor or per axis."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def _broadcast(self, array: np.ndarray) -> np.ndarray:
        if self.axis is None:
            return array.reshape(())
        shape = [1] * self.values.ndim
        shape[self.axis] = -1
        return array.reshape(shape)

    def zero_points(self) -> np.ndarray:
        """The zero point, broadcastable against ``values`` (0 when absent)."""
        if self.zero_point is None:
            return np.zeros((), self.values.dtype)
        return self._broadcast(self.zero_point)

    def blocked_reason(self, step: int) -> str | None:
        """Why the rows cannot be cut every ``step`` rows, or None (blocked quantization)."""
        if self.block_size and self.axis == 0 and step % self.block_size:
            return (
                f"blocked quantization on axis 0 (block_size {self.block_size}) does not align "
                f"with {step} rows per group"
            )
        return None

    def rows(self, rows: slice) -> QuantConst:
        """Rows ``rows`` of axis 0, with their own scale and zero point."""
        if self.block_size:  # the scale has the values' rank: cut it along axis 0 too
            size = self.block_size if self.axis == 0 else 1
            params = slice(rows.start // size, -(-rows.stop // size))
            zero_point = None if self.zero_point is None else self.zero_point[params]
            return dataclasses.replace(self, values=self.values[rows], scale=self.scale[params],
                                       zero_point=zero_point)  # fmt: skip
        if self.axis != 0:
            return dataclasses.replace(self, values=self.values[rows])
        zero_point = None if self.zero_point is None else self.zero_point[rows]
        return dataclasses.replace(
            self, values=self.values[rows], scale=self.scale[rows], zero_point=zero_point
        )

    def per_axis0(self) -> QuantConst:
        """The same tensor with a scale per row of axis 0 (from a per-tensor scale)."""
        if self.axis == 0:
            return self
        rows = self.values.shape[0]
        zero_point = None
        if self.zero_point is not None:
            zero_point = np.full(rows, self.zero_point.reshape(()), self.zero_point.dtype)
        scale = np.full(rows, self.scale.reshape(()), self.scale.dtype)
        return dataclasses.replace(self, scale=scale, zero_point=zero_point, axis=0)

    def with_values(self, values: np.ndarray, tile: int = 1) -> QuantConst:
        """New values of the same quantization; a per-axis scale not on axis 0 is tiled."""
        if self.axis in (None, 0) or tile == 1:
            return dataclasses.replace(self, values=values)
        zero_point = None if self.zero_point is None else np.tile(self.zero_point, tile)
        return dataclasses.replace(
            self, values=values, scale=np.tile(self.scale, tile), zero_point=zero_point
        )


def read_dequantized(value: ir.Value | None, what: str, node: ir.Node) -> QuantConst | None:
    """``value`` as a quantized constant when a DequantizeLinear of constants produces it.

    Returns:
        None when no DequantizeLinear produces ``value`` (it may be a plain constant).

    Raises:
        Refusal: A DequantizeLinear of computed integers, or blocked quantization.
    """
    value = through_identity(value)
    producer = value.producer() if value is not None else None
    if not is_onnx_op(producer, "DequantizeLinear"):
        return None
    arrays = [const_array(v) if v is not None else None for v in producer.inputs[:3]]
    if (
        arrays[0] is None
        or arrays[1] is None
        or (len(producer.inputs) > 2 and producer.inputs[2] is not None and arrays[2] is None)
    ):
        raise Refusal(f"{what} of {NODE} is the DequantizeLinear of a computed tensor", node)
    block = attr_int(producer, "block_size", 0)
    values, scale = arrays[0], arrays[1]
    zero_point = arrays[2] if len(arrays) > 2 else None
    axis = None
    if block or scale.size > 1:
        axis = attr_int(producer, "axis", 1)
        axis = axis + values.ndim if axis < 0 else axis
    else:  # one scale (also a 1-element 1-D one): per tensor, kept as a scalar
        scale = scale.reshape(())
        zero_point = None if zero_point is None else zero_point.reshape(())
    attributes = {k: a for k, a in producer.attributes.items() if k not in ("axis", "block_size")}
    return QuantConst(values, scale, zero_point, axis, attributes, block)


def qlinear_weight(conv: ir.Node) -> QuantConst:
    """A QLinearConv's weight (inputs 3-5); per-axis-0 when its scale has one entry per row."""
    arrays = [const_array(conv.inputs[i]) if conv.inputs[i] is not None else None
              for i in (3, 4, 5)]  # fmt: skip
    if any(a is None for a in arrays):
        raise Refusal(f"weight, scale or zero point of {NODE} is not a constant", conv)
    values, scale, zero_point = arrays
    if scale.size == 1 and zero_point.size == 1:
        return QuantConst(values, scale.reshape(()), zero_point.reshape(()), None)
    rows = values.shape[0]  # per output channel (one of the two may be a single value)
    scale = np.broadcast_to(scale.reshape(-1), (rows,)).copy()
    zero_point = np.broadcast_to(zero_point.reshape(-1), (rows,)).copy()
    return QuantConst(values, scale, zero_point, 0)


def join(parts: list[QuantConst], what: str) -> QuantConst:
    """The parts concatenated on axis 0, each keeping its own scale and zero point exactly."""
    first = parts[0]
    dtypes = {(p.values.dtype.str, p.scale.dtype.str) for p in parts}
    if len(dtypes) > 1:
        raise Refusal(f"{what} are quantized to different types")
    values = np.concatenate([p.values for p in parts], axis=0)
    if any(p.block_size for p in parts):
        return _join_blocked(parts, values, what)
    if all(p.axis is None for p in parts) and _same_params(parts):
        return dataclasses.replace(first, values=values)
    if any(p.axis not in (None, 0) for p in parts):
        if not _same_params(parts) or len({p.axis for p in parts}) > 1:
            raise Refusal(
                f"{what} are quantized per channel on axis {first.axis} with different scales "
                "or zero points; one tensor cannot hold them"
            )
        return dataclasses.replace(first, values=values)
    rows = [p.per_axis0() for p in parts]
    scale = np.concatenate([r.scale for r in rows])
    zero_point = None
    if any(r.zero_point is not None for r in rows):
        zero_point = np.concatenate(
            [r.zero_point if r.zero_point is not None else np.zeros(len(r.scale), values.dtype)
             for r in rows]
        ).astype(values.dtype)  # fmt: skip
    return dataclasses.replace(first, values=values, scale=scale, zero_point=zero_point, axis=0)


def _join_blocked(parts: list[QuantConst], values: np.ndarray, what: str) -> QuantConst:
    """Blocked parts: their scales and zero points end to end on axis 0 (whole blocks only)."""
    first = parts[0]
    if len({(p.block_size, p.axis) for p in parts}) > 1:
        raise Refusal(f"{what} are quantized in different blocks")
    if first.axis == 0 and any(p.values.shape[0] % p.block_size for p in parts[:-1]):
        raise Refusal(f"{what}' blocks on axis 0 do not end where the branches do")
    zero_point = None
    if first.zero_point is not None:
        zero_point = np.concatenate([p.zero_point for p in parts], axis=0)
    scale = np.concatenate([p.scale for p in parts], axis=0)
    return dataclasses.replace(first, values=values, scale=scale, zero_point=zero_point)


def _same_params(parts: list[QuantConst]) -> bool:
    def key(part: QuantConst) -> tuple:
        zero = part.zero_point
        zero = np.zeros(part.scale.shape, np.int64) if zero is None else zero.astype(np.int64)
        return part.scale.reshape(-1).tobytes(), zero.reshape(-1).tobytes()

    return len({key(p) for p in parts}) == 1


def add_dequantized(
    graph: ir.Graph, quant: QuantConst, name: str, *, as_node: bool, before: ir.Node, names
) -> ir.Value:
    """A DequantizeLinear of ``quant``'s constants inserted before ``before``; its output."""
    inputs = [
        add_constant(graph, np.ascontiguousarray(quant.values), names.fresh(f"{name}_quantized"),
                     as_node=as_node, before=before),
        add_constant(graph, np.ascontiguousarray(quant.scale), names.fresh(f"{name}_scale"),
                     as_node=as_node, before=before),
    ]  # fmt: skip
    if quant.zero_point is not None:
        inputs.append(
            add_constant(graph, np.ascontiguousarray(quant.zero_point),
                         names.fresh(f"{name}_zero_point"), as_node=as_node, before=before)
        )  # fmt: skip
    attributes = dict(quant.attributes)
    if quant.axis is not None:
        attributes["axis"] = ir.AttrInt64("axis", quant.axis)
    if quant.block_size:
        attributes["block_size"] = ir.AttrInt64("block_size", quant.block_size)
    node = ir.node("DequantizeLinear", inputs, attributes=attributes, name=names.fresh(name))
    out = node.outputs[0]
    out.name = names.fresh(f"{name}_dequantized")
    out.shape = ir.Shape(quant.values.shape)
    out.type = ir.TensorType(ir.DataType.from_numpy(quant.scale.dtype))
    graph.insert_before(before, node)
    return out


def block_diagonal_quantized(quant: QuantConst, group: int, op_type: str = CONV) -> QuantConst:
    """:func:`block_diagonal_weight` of a quantized weight: off the blocks, the zero point.

    Each position off the blocks holds its row's (or column's) zero point, so it dequantizes
    to exactly 0; a scale per input channel (axis 1) is repeated for every group.
    """
    wide = np.int64
    centred = quant.values.astype(wide) - quant.zero_points().astype(wide)
    dense_centred = block_diagonal_weight(centred, group, op_type)
    dense = quant.with_values(dense_centred, tile=group if quant.axis == 1 else 1)
    values = (dense_centred + dense.zero_points().astype(wide)).astype(quant.values.dtype)
    return dataclasses.replace(dense, values=values)


# Where a convolution keeps its bias: Conv/ConvTranspose input 2, QLinearConv input 8;
# ConvInteger has none.
BIAS_INPUT = {"QLinearConv": 8, "ConvInteger": None}


def bias_input(conv: ir.Node) -> int | None:
    """The index of ``conv``'s bias input (None: the op has no bias)."""
    return BIAS_INPUT.get(conv.op_type, 2)


def read_conv_parameters(
    conv: ir.Node, qlinear_needs: tuple[int, ...] = (0, 3, 4, 5)
) -> tuple[np.ndarray, np.ndarray | None, QuantConst | None, QuantConst | None]:
    """(weight, bias, weight_q, bias_q) of a Conv, ConvTranspose, QLinearConv or ConvInteger.

    A QDQ weight or bias is read through its DequantizeLinear (``*_q`` holds the integers, scales
    and zero points; the arrays are the integers); a QLinearConv's weight through its scale and
    zero point inputs, which must be present with the inputs ``qlinear_needs`` names; a
    ConvInteger's with a scale of ones. Raises ``Refusal`` for what is not constant.
    """
    if conv.op_type == "QLinearConv":
        if len(conv.inputs) < 8 or any(conv.inputs[i] is None for i in qlinear_needs):
            raise Refusal(f"{NODE} lacks a QLinearConv input", conv)
        weight_q, bias_q = qlinear_weight(conv), None
    elif conv.op_type == "ConvInteger":
        weight_q, bias_q = _conv_integer_weight(conv), None
    else:
        if len(conv.inputs) < 2 or conv.inputs[1] is None:
            raise Refusal(f"{NODE} has no weight input", conv)
        weight_q = read_dequantized(conv.inputs[1], "weight", conv)
        bias_q = None
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            bias_q = read_dequantized(conv.inputs[2], "bias", conv)
    weight = weight_q.values if weight_q is not None else const_array(conv.inputs[1])
    if weight is None:
        raise Refusal(f"weight of {NODE} is not a constant", conv)
    index = bias_input(conv)
    bias = None
    if index is not None and len(conv.inputs) > index and conv.inputs[index] is not None:
        bias = bias_q.values if bias_q is not None else const_array(conv.inputs[index])
        if bias is None:
            raise Refusal(f"bias of {NODE} is not a constant", conv)
    return weight, bias, weight_q, bias_q


def _conv_integer_weight(conv: ir.Node) -> QuantConst:
    """A ConvInteger's weight and zero point (input 3, per tensor or one per output channel);
    it has no scale, so the scale is ones."""
    weight = const_array(conv.inputs[1])
    zero = None
    if len(conv.inputs) > 3 and conv.inputs[3] is not None:
        zero = const_array(conv.inputs[3])
        if zero is None:
            raise Refusal(f"weight zero point of {NODE} is not a constant", conv)
    if weight is None:
        raise Refusal(f"weight of {NODE} is not a constant", conv)
    axis = 0 if zero is not None and zero.size > 1 else None
    rows = weight.shape[0] if axis == 0 else 1
    scale = np.ones(rows, np.float32) if axis == 0 else np.float32(1)
    zero = zero.reshape(-1) if axis == 0 else (None if zero is None else zero.reshape(()))
    return QuantConst(weight, np.asarray(scale), zero, axis)
