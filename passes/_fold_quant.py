"""The quantized side of the fold: activation Q/DQ around each branch, and QLinearConv branches.

What ``onnxruntime.quantization`` writes for a split-conv-concat block (QDQ form)::

    X ─ Split ─ Q(s_i,z_i) ─ DQ(s_i,z_i) ─ Conv(DQ W_i, DQ B_i) ─ Q(t_i,u_i) ─ DQ(t_i,u_i) ─ Concat

folds into::

    X ─ [Slice] ─ Q(s,z) ─ DQ(s,z) ─ Conv(DQ(concat W_i), DQ(concat B_i), group) ─ Q(t,u) ─ DQ(t,u)

The input pair may also be a DQ alone, reading integer parts of an integer tensor (``Xq ─ Split ─
DQ ─ Conv``, what the expand pass writes). When does one grouped conv compute the same thing?
QuantizeLinear and DequantizeLinear act on each element alone, with the scale and zero point of
its channel; so applying, to the concatenated tensor, a Q/DQ whose per-channel (axis 1) scale
and zero point repeat each branch's over that branch's channels gives every element exactly
what its branch gave. Hence the conditions, checked here:

* every branch has the same pairs (an input Q or not, an input DQ or not, an output Q/DQ or not);
* every Q/DQ has constant scale and zero point, per tensor or per channel on axis 1, and the same
  zero-point type and attributes in every branch;
* when every branch has the same scale and zero point the folded Q/DQ keeps them per tensor;
  otherwise it is per channel on axis 1, which needs opset 13 (refused before).

``QLinearConv`` branches (``Split ─ QLinearConv_i ─ Concat`` of integers, what the expand pass
writes) fold into one QLinearConv when every branch has the same x scale and zero point and the
same y scale and zero point: a QLinearConv takes one of each, so different ones (what
``quantize_static`` writes, each branch's output requantized by a QLinearConcat) are refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ._common import NODE, Refusal, add_constant, attr_int, const_array, is_onnx_op
from ._driver import Scope

QDQ = ("QuantizeLinear", "DequantizeLinear")
PER_AXIS_OPSET = 13


@dataclasses.dataclass
class Params:
    """One Q or DQ node's constant scale and zero point, per tensor (``axis`` None) or axis 1."""

    node: ir.Node
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None

    def over(self, channels: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Scale and zero point repeated over ``channels`` channels."""
        if self.axis is not None:
            return self.scale, self.zero_point
        zero = None
        if self.zero_point is not None:
            zero = np.full(channels, self.zero_point.reshape(()), self.zero_point.dtype)
        return np.full(channels, self.scale.reshape(()), self.scale.dtype), zero


def output_pair(value: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """(Q, DQ) when ``value`` is ``DQ(Q(...))``, the pair a quantizer puts after a branch."""
    dq = value.producer()
    if not is_onnx_op(dq, "DequantizeLinear") or dq.inputs[0] is None:
        return None
    q = dq.inputs[0].producer()
    if not is_onnx_op(q, "QuantizeLinear") or q.inputs[0] is None:
        return None
    return q, dq


def input_nodes(conv: ir.Node) -> list[ir.Node]:
    """The [Q] DQ nodes between a Conv and the Split/Slice part it reads, outermost first."""
    if conv.op_type not in ("Conv", "ConvTranspose") or not conv.inputs or conv.inputs[0] is None:
        return []
    dq = conv.inputs[0].producer()
    if not is_onnx_op(dq, "DequantizeLinear") or dq.inputs[0] is None:
        return []
    q = dq.inputs[0].producer()
    if is_onnx_op(q, "QuantizeLinear") and q.inputs[0] is not None:
        return [q, dq]
    return [dq]


def data_input(conv: ir.Node) -> ir.Value | None:
    """The value a branch's Conv reads, before its input Q/DQ."""
    nodes = input_nodes(conv)
    if nodes:
        return nodes[0].inputs[0]
    return conv.inputs[0] if conv.inputs else None


def read_params(node: ir.Node, rank: int) -> Params:
    """A Q/DQ's constant scale and zero point, per tensor or per channel (axis 1)."""
    scale = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    has_zero = len(node.inputs) > 2 and node.inputs[2] is not None
    zero = const_array(node.inputs[2]) if has_zero else None
    if scale is None or (has_zero and zero is None):
        raise Refusal(f"{NODE}: scale or zero point is not a constant", node)
    if attr_int(node, "block_size", 0):
        raise Refusal(f"{NODE}: blocked quantization of an activation", node)
    if scale.size == 1 and scale.ndim == 0:
        return Params(node, scale, zero, None)
    axis = attr_int(node, "axis", 1)
    if (axis + rank if axis < 0 else axis) != 1:
        raise Refusal(f"{NODE} quantizes per axis {axis}, not per channel (axis 1)", node)
    return Params(node, scale.reshape(-1), None if zero is None else zero.reshape(-1), 1)


def check_pairs(
    pairs: list[list[ir.Node]], rank: int, opset: int, where: str
) -> list[list[Params]]:
    """Raise unless the branches' Q/DQ nodes at one place can become one; return their params.

    ``pairs[i]`` are branch i's nodes at that place (empty: none), in the same order. The
    result has one column per node position, each with every branch's params.
    """
    kinds = {tuple(n.op_type for n in nodes) for nodes in pairs}
    if len(kinds) > 1:
        raise Refusal(f"branches differ in the quantization of their {where}: {sorted(kinds)}")
    params = [[read_params(n, rank) for n in nodes] for nodes in pairs]
    for position in range(len(pairs[0])):
        column = [p[position] for p in params]
        signatures = {
            (
                None if p.zero_point is None else p.zero_point.dtype.str,
                tuple(sorted((k, repr(a.value)) for k, a in p.node.attributes.items()
                             if k != "axis")),
            )
            for p in column
        }  # fmt: skip
        if len(signatures) > 1:
            raise Refusal(
                f"branches quantize their {where} to different types or with different attributes"
            )
        if not _shared(column) and opset < PER_AXIS_OPSET:
            raise Refusal(
                f"branches quantize their {where} with different scales, and per-channel "
                f"quantization needs opset {PER_AXIS_OPSET} (model: {opset})"
            )
    return [[p[position] for p in params] for position in range(len(pairs[0]))]


def _shared(column: list[Params]) -> bool:
    first = column[0]
    return all(
        p.axis is None
        and p.scale.tobytes() == first.scale.tobytes()
        and (p.zero_point is None) == (first.zero_point is None)
        and (p.zero_point is None or p.zero_point.tobytes() == first.zero_point.tobytes())
        for p in column
    )


def apply_pairs(
    value: ir.Value,
    columns: list[list[Params]],
    widths: list[int],
    scope: Scope,
    before: ir.Node,
    base: str,
) -> tuple[ir.Value, list[ir.Node], list[str]]:
    """Apply the branches' Q/DQ nodes (one column per node position) to the joined ``value``.

    Returns the last output, the new nodes (not yet inserted) and notes for the report.
    """
    nodes, notes = [], []
    for column in columns:
        first = column[0]
        attributes = {k: a for k, a in first.node.attributes.items() if k != "axis"}
        if _shared(column):
            inputs = list(first.node.inputs[1:])
        else:
            parts = [p.over(w) for p, w in zip(column, widths)]
            scale = np.concatenate([s for s, _ in parts])
            inputs = [_constant(scope, scale, f"{base}_scale", before)]
            if first.zero_point is not None:
                zero = np.concatenate([z for _, z in parts]).astype(first.zero_point.dtype)
                inputs.append(_constant(scope, zero, f"{base}_zero_point", before))
            attributes["axis"] = ir.AttrInt64("axis", 1)
            note = f"{first.node.op_type} per channel: the branches' scales differ"
            if note not in notes:
                notes.append(note)
        node = ir.node(
            first.node.op_type, [value, *inputs], attributes=attributes,
            name=scope.names.fresh(f"{base}_{first.node.op_type.lower()}"),
        )  # fmt: skip
        out = node.outputs[0]
        out.name = scope.names.fresh(f"{node.name}_out")
        out.type = first.node.outputs[0].type
        nodes.append(node)
        value = out
    return value, nodes, notes


def _constant(scope: Scope, array: np.ndarray, base: str, before: ir.Node) -> ir.Value:
    return add_constant(scope.graph, array, scope.names.fresh(base), as_node=scope.in_function,
                        before=before)  # fmt: skip


def check_qlinear(convs: list[ir.Node]) -> None:
    """QLinearConv branches must share their x and y scales and zero points."""
    for label, indices in (("input", (1, 2)), ("output", (6, 7))):
        keys = set()
        for conv in convs:
            arrays = [const_array(conv.inputs[i]) for i in indices]
            if any(a is None for a in arrays):
                raise Refusal(f"{NODE}: {label} scale or zero point is not a constant", conv)
            keys.add(tuple(a.tobytes() for a in arrays))
        if len(keys) > 1:
            raise Refusal(
                f"QLinearConv branches have different {label} scales or zero points; one "
                "QLinearConv takes one of each"
            )
