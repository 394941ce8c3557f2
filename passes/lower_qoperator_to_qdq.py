"""Lower QOperator-format ops that TVM cannot import into DequantizeLinear -> float op -> Q.

Before::

    x(u8) ─┐
    x_scale, x_zp, w(i8), w_scale[M], w_zp[M], y_scale, y_zp, B(i32) ─ QLinearConv(group=G) ─ y(u8)

After::

    x ─ DequantizeLinear(x_scale, x_zp) ───────────────────┐
    w ─ DequantizeLinear(w_scale, w_zp, axis=0) ───────────┼─ Conv(group=G) ─ QuantizeLinear ─ y
    B ─ DequantizeLinear(x_scale * w_scale, axis=0) ───────┘         (y_scale, y_zp)

and, for the com.microsoft element-wise ops (``QLinearAdd``, ``QLinearMul``, ``QLinearConcat``,
``QLinearAveragePool``, ``QLinearGlobalAveragePool``, ``QLinearSigmoid``,
``QLinearLeakyRelu``)::

    a ─ QLinearAdd(a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp) ─ y
    =>
    a ─ DequantizeLinear ─┐
    b ─ DequantizeLinear ─┴─ Add ─ QuantizeLinear(y_scale, y_zp) ─ y

``ConvInteger`` (integer accumulation, int32 output) becomes DequantizeLinear with scale 1 of
both operands, Conv, Cast to int32.

TVM 0.27's Relax ONNX importer reads QuantizeLinear, DequantizeLinear and the float ops, but
none of the ops above (checked against ``tvm/relax/frontend/onnx/onnx_frontend.py``'s convert
map), while onnxruntime's ``quantize_static`` writes them in QOperator format.

Exactness: the lowered graph computes each output in float from the dequantized operands and
rounds it once, half to even, as onnxruntime's own kernels do; where its float sum lands within
rounding error of a tie the integer output may differ by one step (the check's quantized rule).
``ConvInteger`` is exact: its operands dequantize to small integers, and it is lowered only when
every partial sum stays below 2**24, where float32 holds integers exactly.

Lowers when:
    * the node is one of the ops above, in its domain (ONNX, or com.microsoft for the QLinear
      element-wise ops), and the model imports ONNX opset 13 or later (per-axis
      DequantizeLinear);
    * per-tensor scales and zero points are scalars or one-element constants;
    * ``QLinearConv``'s weight scale and zero point are constants with one entry, or one per
      output channel (either may be a single value), and ``x_scale`` is a constant when there
      is a bias;
    * ``ConvInteger``'s weight and zero points are constants, its zero points per tensor.

Refuses, leaving the node as it is and recording why: ``channels_last=1`` pools, a per-tensor
scale or zero point with several entries or not a constant where one is needed, and a
``ConvInteger`` whose sums could leave float32's exact integers.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from ._common import (
    NODE,
    Refusal,
    add_constant,
    attr_int,
    const_array,
    node_label,
    remove_with_dead_producers,
    take_over_value,
)
from ._driver import AnchoredPass, Match, Scope

logger = logging.getLogger(__name__)

PASS_NAME = "lower-qoperator-to-qdq"
MS_DOMAIN = "com.microsoft"
# float32 holds every integer up to 2**24 exactly.
FLOAT32_EXACT_INTEGERS = 2**24
# ConvInteger's input is int8 or uint8: |x - x_zero_point| <= 255 whatever the zero point.
X_SPAN = 255
# A value to use as it is, or an array to add as a new constant.
_Param = ir.Value | np.ndarray


@dataclasses.dataclass
class _Dequant:
    """One quantized operand: ``DequantizeLinear(values, scale, zero_point, axis)``."""

    values: ir.Value
    scale: _Param
    zero_point: _Param | None
    axis: int | None = None


@dataclasses.dataclass
class _Lowering(Match):
    inputs: list[_Dequant]
    op_type: str
    attributes: dict[str, ir.Attr]
    out_scale: _Param | None
    """None: the float result is cast to int32 (ConvInteger) instead of quantized."""
    out_zero_point: _Param | None


class LowerQOperatorToQDQ(AnchoredPass):
    """Rewrite QLinearConv, ConvInteger and com.microsoft QLinear* ops into QDQ form.

    After a call, ``rewrites`` lists the lowered nodes and ``skips`` those that could not be
    lowered, with the reason.

    Args:
        subgraphs: Also lower inside If/Loop/Scan bodies.
        functions: Also lower inside model-local functions.
    """

    pass_name = PASS_NAME

    def __init__(self, *, subgraphs: bool = True, functions: bool = True) -> None:
        super().__init__(subgraphs=subgraphs, functions=functions)
        self._opset = 0

    def _begin(self, model: ir.Model) -> None:
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))

    def _is_anchor(self, node: ir.Node) -> bool:
        if node.domain in ("", "ai.onnx"):
            return node.op_type in ONNX_LOWERINGS
        return node.domain == MS_DOMAIN and node.op_type in MS_LOWERINGS

    def _match(self, node: ir.Node) -> _Lowering:
        if self._opset < 13:
            raise Refusal(
                f"{NODE}: the model imports ONNX opset {self._opset}; lowering needs "
                "DequantizeLinear with axis (opset 13)",
                node,
            )
        table = ONNX_LOWERINGS if node.domain in ("", "ai.onnx") else MS_LOWERINGS
        return table[node.op_type](node)

    def _rewrite(self, match: _Lowering, scope: Scope) -> list[dict]:
        node, graph, names = match.anchor, scope.graph, scope.names
        base = node.name or node.op_type

        def value(param: _Param, suffix: str) -> ir.Value:
            if isinstance(param, ir.Value):
                return param
            name = names.fresh(f"{base}_{suffix}")
            return add_constant(graph, np.ascontiguousarray(param), name,
                                as_node=scope.in_function, before=node)  # fmt: skip

        def add(op_type: str, inputs: list, attributes: dict, suffix: str, dtype) -> ir.Value:
            new = ir.node(
                op_type, inputs, attributes=attributes, name=names.fresh(f"{base}_{suffix}")
            )
            new.outputs[0].name = names.fresh(f"{base}_{suffix}_output")
            new.outputs[0].type = ir.TensorType(dtype)
            graph.insert_before(node, new)
            return new.outputs[0]

        floats = []
        for i, operand in enumerate(match.inputs):
            scale = value(operand.scale, f"scale_{i}")
            inputs = [operand.values, scale]
            if operand.zero_point is not None:
                inputs.append(value(operand.zero_point, f"zero_point_{i}"))
            axis = {} if operand.axis is None else {"axis": ir.AttrInt64("axis", operand.axis)}
            floats.append(add("DequantizeLinear", inputs, axis, f"dequantized_{i}", scale.dtype))
        result = add(match.op_type, floats, match.attributes, "float", floats[0].dtype)
        if match.out_scale is None:
            to = ir.AttrInt64("to", ir.DataType.INT32)
            final = add("Cast", [result], {"to": to}, "int32", ir.DataType.INT32)
        else:
            params = [value(match.out_scale, "y_scale"), value(match.out_zero_point, "y_zp")]
            final = add("QuantizeLinear", [result, *params], {}, "quantized", params[1].dtype)
        take_over_value(node.outputs[0], final, names, "qoperator")
        remove_with_dead_producers(graph, [node])
        summary = f"{node.op_type} -> {_chain(match)}"
        logger.info("%s: %s", node_label(node), summary)
        details = {"op_type": node.op_type, "float_op": match.op_type,
                   "per_channel": any(d.axis is not None for d in match.inputs)}  # fmt: skip
        return [{"summary": summary, "details": details}]


def _chain(match: _Lowering) -> str:
    last = "QuantizeLinear" if match.out_scale is not None else "Cast(int32)"
    group = match.attributes.get("group")
    op = match.op_type + (f"(group={group.as_int()})" if group is not None else "")
    return f"{len(match.inputs)} x DequantizeLinear, {op}, {last}"


# ------------------------------------------------------------------------------ matching


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _scalar(node: ir.Node, index: int, what: str) -> _Param | None:
    """A per-tensor scale or zero point as a scalar (None when the optional input is absent)."""
    param = _input(node, index)
    if param is None:
        return None
    if param.shape is not None and param.shape.rank() == 0:
        return param
    array = const_array(param)
    if array is None:
        raise Refusal(f"{what} of {NODE} is neither a scalar nor a constant", node)
    if array.size != 1:
        raise Refusal(f"{what} of {NODE} has {array.size} entries; one was expected", node)
    return array.reshape(())


def _operand(node: ir.Node, index: int, what: str) -> _Dequant:
    """Inputs ``index`` (values), ``index + 1`` (scale) and ``index + 2`` (zero point)."""
    scale = _scalar(node, index + 1, f"{what} scale")
    if scale is None:
        raise Refusal(f"{NODE} has no {what} scale", node)
    return _Dequant(node.inputs[index], scale, _scalar(node, index + 2, f"{what} zero point"))


def _output_zero_point(node: ir.Node, index: int, operand: _Dequant) -> _Param:
    """The output zero point; an absent one is 0 of the output's type (QuantizeLinear's own
    default would be uint8, whatever the output)."""
    zero_point = _scalar(node, index, "output zero point")
    if zero_point is not None:
        return zero_point
    dtype = node.outputs[0].dtype or operand.values.dtype
    if dtype is None:
        raise Refusal(f"{NODE} has no output zero point and its output type is unknown", node)
    return np.zeros((), dtype.numpy())


def _copied(node: ir.Node, drop: tuple[str, ...] = ()) -> dict[str, ir.Attr]:
    return {k: ir.Attr(k, a.type, a.value) for k, a in node.attributes.items() if k not in drop}


def _channels_first(node: ir.Node) -> None:
    if attr_int(node, "channels_last", 0):
        raise Refusal(f"{NODE} is channels_last (NHWC); the float op is NCHW", node)


def _binary(op_type: str):
    def lower(node: ir.Node) -> _Lowering:
        a, b = _operand(node, 0, "A"), _operand(node, 3, "B")
        out = _scalar(node, 6, "output scale")
        return _Lowering(node, [a, b], op_type, {}, out, _output_zero_point(node, 7, a))

    return lower


def _unary(op_type: str):
    def lower(node: ir.Node) -> _Lowering:
        _channels_first(node)
        x = _operand(node, 0, "X")
        out = _scalar(node, 3, "output scale")
        attributes = _copied(node, ("channels_last",))
        return _Lowering(node, [x], op_type, attributes, out, _output_zero_point(node, 4, x))

    return lower


def _qlinear_concat(node: ir.Node) -> _Lowering:
    if len(node.inputs) < 5 or (len(node.inputs) - 2) % 3:
        raise Refusal(f"{NODE} has {len(node.inputs)} inputs; expected 2 + 3 per tensor", node)
    operands = [_operand(node, i, f"input {(i - 2) // 3}") for i in range(2, len(node.inputs), 3)]
    zero_point = _output_zero_point(node, 1, operands[0])
    return _Lowering(node, operands, "Concat", _copied(node), _scalar(node, 0, "Y scale"),
                     zero_point)  # fmt: skip


def _per_channel(node: ir.Node, what: str) -> tuple[_Param, _Param, int | None]:
    """QLinearConv's weight scale and zero point: per tensor, or per output channel (axis 0)."""
    scale_in, zp_in = node.inputs[4], node.inputs[5]
    scale, zero_point = const_array(scale_in), const_array(zp_in)
    if scale is None or zero_point is None:
        raise Refusal(f"{what} scale or zero point of {NODE} is not a constant", node)
    if scale.size == 1 and zero_point.size == 1:
        return _scalar(node, 4, f"{what} scale"), _scalar(node, 5, f"{what} zero point"), None
    rows = max(scale.size, zero_point.size)
    if {scale.size, zero_point.size} - {1, rows}:
        raise Refusal(
            f"{what} of {NODE} has {scale.size} scales and {zero_point.size} zero points", node
        )
    # One may be a single value while the other is per channel: DequantizeLinear needs both.
    scale = np.broadcast_to(scale.reshape(-1), (rows,)).copy()
    zero_point = np.broadcast_to(zero_point.reshape(-1), (rows,)).copy()
    keep_scale = scale_in.shape is not None and list(scale_in.shape) == [rows]
    keep_zp = zp_in.shape is not None and list(zp_in.shape) == [rows]
    return (scale_in if keep_scale else scale), (zp_in if keep_zp else zero_point), 0


def _qlinear_conv(node: ir.Node) -> _Lowering:
    if len(node.inputs) < 8:
        raise Refusal(f"{NODE} has {len(node.inputs)} inputs; expected 8 or 9", node)
    x = _operand(node, 0, "x")
    w_scale, w_zp, axis = _per_channel(node, "weight")
    operands = [x, _Dequant(node.inputs[3], w_scale, w_zp, axis)]
    bias = _input(node, 8)
    if bias is not None:
        x_scale = const_array(node.inputs[1])
        w_scales = const_array(node.inputs[4]) if isinstance(w_scale, ir.Value) else w_scale
        if x_scale is None:
            raise Refusal(f"{NODE} has a bias and its x_scale is not a constant", node)
        # The bias is int32 in units of x_scale * w_scale (ONNX QLinearConv), zero point 0.
        bias_scale = (x_scale.reshape(()) * w_scales).astype(x_scale.dtype)
        operands.append(_Dequant(bias, bias_scale, None, axis))
    out = _scalar(node, 6, "y scale")
    return _Lowering(node, operands, "Conv", _copied(node), out, _output_zero_point(node, 7, x))


def _conv_integer(node: ir.Node) -> _Lowering:
    """ConvInteger: exact in float32 when every partial sum stays below 2**24."""
    x, w = node.inputs[0], node.inputs[1]
    weight = const_array(w)
    if weight is None:
        raise Refusal(f"weight of {NODE} is not a constant", node)
    zero_points = []
    for index, what in ((2, "x zero point"), (3, "w zero point")):
        zero_point = _scalar(node, index, what)
        if zero_point is not None and const_array(_input(node, index)) is None:
            raise Refusal(f"{what} of {NODE} is not a constant", node)
        zero_points.append(zero_point)
    w_zp = 0 if zero_points[1] is None else int(const_array(node.inputs[3]).reshape(()))
    rows = np.abs(weight.astype(np.int64) - w_zp).reshape(weight.shape[0], -1).sum(axis=1)
    if rows.max(initial=0) * X_SPAN >= FLOAT32_EXACT_INTEGERS:
        raise Refusal(
            f"{NODE}: sums up to {int(rows.max()) * X_SPAN} could leave float32's exact "
            f"integers (2**24); left as ConvInteger",
            node,
        )
    one = np.ones((), np.float32)
    operands = [_Dequant(x, one, zero_points[0]), _Dequant(w, one, zero_points[1])]
    return _Lowering(node, operands, "Conv", _copied(node), None, None)


ONNX_LOWERINGS = {"QLinearConv": _qlinear_conv, "ConvInteger": _conv_integer}
MS_LOWERINGS = {
    "QLinearAdd": _binary("Add"),
    "QLinearMul": _binary("Mul"),
    "QLinearConcat": _qlinear_concat,
    "QLinearAveragePool": _unary("AveragePool"),
    "QLinearGlobalAveragePool": _unary("GlobalAveragePool"),
    "QLinearSigmoid": _unary("Sigmoid"),
    "QLinearLeakyRelu": _unary("LeakyRelu"),
}
