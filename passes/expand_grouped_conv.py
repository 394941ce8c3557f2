"""Expand a grouped Conv (or ConvTranspose) into convolutions a target without groups can run.

Split mode, before::

    X ─ Conv(W, b, group=G) ─ Y

after::

          ┌─ Conv(W[0], b[0]) ───┐
    X ─ Split(axis=1) ─ Conv(W[1], b[1]) ─ Concat(axis=1) ─ Y
          └─ Conv(W[G-1], b[G-1]) ┘

where W[i], b[i] are group i's slice of the weight and bias: output channels
``[i·C_out/G, (i+1)·C_out/G)`` of a Conv weight ``[C_out, C_in/G, k...]``, input channels
``[i·C_in/G, (i+1)·C_in/G)`` of a ConvTranspose weight ``[C_in, C_out/G, k...]``. The Split
takes the form the model's opset expects (opset < 13: ``split`` attribute; 13 and later: the
sizes as an input). This is the exact inverse of the fold pass: folding the result gives back
the grouped Conv with bit-equal weights.

Dense mode, before::

    X ─ Conv(W, b, group=G) ─ Y

after::

    X ─ Conv(blockdiag(W[0], ..., W[G-1]), b, group=1) ─ Y

one ungrouped convolution whose weight is zero outside each group's block (``[C_out, C_in,
k...]`` for Conv, ``[C_in, C_out, k...]`` for ConvTranspose). It does G times the multiply-adds
of the grouped one; from ``warn_multiplier`` up the pass records a warning, and above
``max_dense_multiplier`` it expands by split instead.

Quantized models, split mode::

    Xq ─ DQ ─ Conv(DQ(Wq, s_w, z_w), DQ(Bq, s_b), group=G) ─ Q ─ DQ ─ Y
  ->
    Xq ─ Split ─ DQ ─ Conv(DQ(Wq[i], s_w[i], z_w[i]), DQ(Bq[i], s_b[i])) ─┐
               └ ...  (one per group)                                   ├─ Concat ─ Q ─ DQ ─ Y

and ``QLinearConv(Xq, s_x, z_x, Wq, s_w, z_w, s_y, z_y, B, group=G)`` becomes a Split of ``Xq``, G
QLinearConvs (``Wq[i]``, ``s_w[i]``, ``z_w[i]``, ``B[i]``; the x and y scales shared) and a Concat
of their integer outputs; ``ConvInteger`` likewise (its weight zero point split with the rows when
it has one per output channel, though onnxruntime runs only one per tensor). A weight or bias that
is ``DequantizeLinear`` of constants (int8/uint8, int4/uint4, int16/uint16, int32 bias) is split in
the integer domain: per-channel scales and zero points (axis 0) go with their rows, a per-tensor one
stays shared, blocked ones (opset 21) are cut with the rows in whole blocks, and dense mode expands
those by split instead (see :mod:`._quant`). A Conv input dequantized per tensor is split before its
DequantizeLinear (each part gets a copy), so each branch keeps the DQ -> Conv form QDQ consumers
look for. Dense mode puts the zero point off the blocks, which dequantizes to exactly 0. Every
output channel is computed from the same integers and scales as before: QLinearConv outputs are
bit-identical, and so are QDQ ones in onnxruntime (which runs a grouped Conv one group at a time).

Every other attribute (kernel_shape, strides, pads, auto_pad, dilations, output_padding,
output_shape) is kept on each new convolution, so every padding form, 1-D to 3-D kernels and
symbolic batch or spatial dims carry over. The rewrite is anchored at the Conv and its result
takes over the Conv output's name, type and shape.

Expands when:
    * the node is an ONNX Conv or ConvTranspose (of the op types asked for) with ``group > 1``;
    * its weight (and bias, if any) are constants: initializers not also graph inputs, or
      Constant nodes, also seen through chains of Identity nodes;
    * the weight's channel counts divide into the groups and agree with the input's static
      channel dim, when it has one;
    * the options allow it: the node is not named in ``skip``, ``min_group <= group <=
      max_group``, it is not a depthwise conv (``group == C_in``) while ``keep_depthwise``,
      and ``select`` (a target's cost model, say) returns None for it.

Refuses, leaving the node as it is and recording why: a weight or bias that is computed or
can be fed at run time (also as the DequantizeLinear of such a tensor), blocked quantization
whose blocks on axis 0 a group boundary cuts, channel counts that do not divide by the group,
an input whose channels disagree with the weight, and every case the options exclude (for
``select``, with the reason it returned).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from ._common import (
    CONV_OPS,
    NODE,
    ConvAttrs,
    Refusal,
    add_constant,
    attr_int,
    const_array,
    conv_attrs,
    is_onnx_op,
    node_label,
    remove_with_dead_producers,
    take_over_value,
)
from ._driver import AnchoredPass, Match, Scope
from ._geometry import ConvGeometry, block_diagonal_weight
from ._quant import (
    QuantConst,
    add_dequantized,
    bias_input,
    block_diagonal_quantized,
    read_conv_parameters,
)

logger = logging.getLogger(__name__)

PASS_NAME = "expand-grouped-conv"
MODES = ("split", "dense")
# Dense expansion does `group` times the multiply-adds; from this factor on it is worth a warning.
LARGE_DENSE_MULTIPLIER = 4.0
# Split changed from a `split` attribute to a `split` input in opset 13.
SPLIT_INPUT_OPSET = 13

# Quantized convolutions with the layout of Conv, expanded when "Conv" is among the op types.
QUANTIZED_CONV_OPS = ("QLinearConv", "ConvInteger")
Select = Callable[[ir.Node, ConvGeometry], "str | None"]
"""Decides per node: None expands it, a string leaves it alone with that string as the reason."""


@dataclasses.dataclass
class _Match(Match):
    attrs: ConvAttrs
    geometry: ConvGeometry
    weight: np.ndarray
    bias: np.ndarray | None
    mode: str
    note: str | None = None
    weight_q: QuantConst | None = None
    """The weight's integers, scale and zero point (QDQ weight or QLinearConv)."""
    bias_q: QuantConst | None = None

    @property
    def conv(self) -> ir.Node:
        return self.anchor

    @property
    def group(self) -> int:
        return self.geometry.group


class ExpandGroupedConv(AnchoredPass):
    """Expand Conv/ConvTranspose nodes with ``group > 1`` into split-conv-concat or one dense Conv.

    After a call, ``rewrites`` lists the expanded nodes, ``skips`` the grouped convolutions
    left alone with the reason, and ``warnings`` the dense expansions that multiply the work.

    Args:
        mode: ``"split"`` (Split -> G Convs -> Concat) or ``"dense"`` (one block-diagonal Conv).
        keep_depthwise: Leave depthwise convolutions (``group == C_in``) as they are.
        min_group: Only expand convolutions with at least this many groups.
        max_group: Only expand convolutions with at most this many groups.
        skip: Node names to leave alone.
        op_types: Which of ``Conv`` and ``ConvTranspose`` to expand.
        max_dense_multiplier: In dense mode, expand by split instead when the dense Conv
            would do more than this many times the work of the grouped one.
        warn_multiplier: In dense mode, record a warning from this work multiplier on.
        select: Called with each grouped convolution that passes every other check and its
            geometry; None expands it, a string leaves it alone and is the reason reported
            (how a target passes its own cost decision in).
        subgraphs: Also expand inside If/Loop/Scan bodies.
        functions: Also expand inside model-local functions.
    """

    pass_name = PASS_NAME

    def __init__(
        self,
        *,
        mode: str = "split",
        keep_depthwise: bool = False,
        min_group: int | None = None,
        max_group: int | None = None,
        skip: Iterable[str] = (),
        op_types: Iterable[str] = CONV_OPS,
        max_dense_multiplier: float | None = None,
        warn_multiplier: float = LARGE_DENSE_MULTIPLIER,
        select: Select | None = None,
        subgraphs: bool = True,
        functions: bool = True,
    ):
        super().__init__(subgraphs=subgraphs, functions=functions)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        op_types = tuple(op_types)
        unknown = set(op_types) - set(CONV_OPS)
        if unknown:
            raise ValueError(f"op_types must be among {CONV_OPS}, got {sorted(unknown)}")
        if min_group is not None and max_group is not None and min_group > max_group:
            raise ValueError(f"min_group {min_group} is above max_group {max_group}")
        self.mode = mode
        self.keep_depthwise = keep_depthwise
        self.min_group = min_group
        self.max_group = max_group
        self.skip = frozenset(skip)
        self.op_types = op_types
        self.max_dense_multiplier = max_dense_multiplier
        self.warn_multiplier = warn_multiplier
        self.select = select
        self.warnings: list[str] = []

    def _begin(self, model: ir.Model) -> None:
        self.warnings = []

    def _is_anchor(self, node: ir.Node) -> bool:
        quantized = QUANTIZED_CONV_OPS if "Conv" in self.op_types else ()
        return is_onnx_op(node, *self.op_types, *quantized)

    # ----------------------------------------------------------------------------- matching

    def _match(self, conv: ir.Node) -> _Match | None:
        """The expansion of ``conv``; None if it is not grouped at all."""
        group = attr_int(conv, "group", 1)
        if group <= 1:
            return None
        if conv.name and conv.name in self.skip:
            raise Refusal("named in the skip list", conv)
        if len(conv.inputs) < 2 or conv.inputs[1] is None or conv.inputs[0] is None:
            raise Refusal(f"{NODE} has no data or weight input", conv)
        weight, bias, weight_q, bias_q = read_conv_parameters(conv)
        if weight.ndim < 3:
            raise Refusal(f"{NODE} has a weight of rank {weight.ndim}", conv)
        attrs = conv_attrs(conv, weight.shape)
        geometry = ConvGeometry.from_weight(conv.op_type, weight.shape, group)
        _check_channels(conv, geometry, bias)
        match = _Match(conv, attrs, geometry, weight, bias, self.mode, None, weight_q, bias_q)
        self._check_options(match)
        for quant, rows in (
            (weight_q, geometry.weight_group_axis_size),
            (bias_q, geometry.out_per_group),
        ):
            reason = quant.blocked_reason(rows) if quant is not None else None
            if reason is not None:
                raise Refusal(f"{NODE}: {reason}", conv)
        if match.mode == "dense" and weight_q is not None and weight_q.block_size:
            match.mode = "split"
            match.note = "split instead of dense: a block-diagonal weight would cut its blocks"
        limit = self.max_dense_multiplier
        if match.mode == "dense" and limit is not None and group > limit:
            match.mode = "split"
            match.note = (
                f"split instead of dense: a dense {conv.op_type} would do {group}x the work "
                f"(limit {limit:g}x)"
            )
        return match

    def _check_options(self, match: _Match) -> None:
        """Raise if the options leave this convolution alone."""
        conv, geometry, group = match.conv, match.geometry, match.group
        if self.keep_depthwise and geometry.is_depthwise:
            raise Refusal(
                f"depthwise (group {group} == {geometry.in_channels} input channels): kept", conv
            )
        if self.min_group is not None and group < self.min_group:
            raise Refusal(f"group {group} is below the minimum {self.min_group}: kept", conv)
        if self.max_group is not None and group > self.max_group:
            raise Refusal(f"group {group} is above the maximum {self.max_group}: kept", conv)
        if self.select is not None:
            reason = self.select(conv, geometry)
            if reason is not None:
                raise Refusal(reason, conv)

    # ----------------------------------------------------------------------------- rewriting

    def _rewrite(self, match: _Match, scope: Scope) -> list[dict]:
        conv = match.conv
        base = scope.names.fresh(f"{conv.name or conv.op_type.lower()}_expanded")
        if match.mode == "split":
            new_nodes, result, details = _split(match, scope, base)
            summary = (
                f"{conv.op_type}(group={match.group}) -> Split -> {match.group} x "
                f"{conv.op_type}, weight {list(details['branch_weight_shape'])} each -> Concat"
            )
        else:
            new_nodes, result, details = _dense(match, scope, base)
            summary = (
                f"{conv.op_type}(group={match.group}) -> one dense {conv.op_type}, weight "
                f"{details['weight_shape']} ({match.group}x the multiply-adds)"
            )
            if match.group >= self.warn_multiplier:
                warning = (
                    f"{node_label(conv)}: dense expansion does {match.group}x the multiply-adds "
                    f"of the grouped {conv.op_type} ({100 * (1 - 1 / match.group):.0f}% of "
                    "the weight is zeros); consider mode 'split'"
                )
                self.warnings.append(warning)
                logger.info("%s", warning)
        if match.note:
            summary += f"; {match.note}"
        scope.graph.insert_before(conv, new_nodes)

        # The result takes over the Conv output's name, so value_info and graph outputs hold.
        take_over_value(conv.outputs[0], result, scope.names, "expanded")
        remove_with_dead_producers(scope.graph, [conv])
        details.update(
            {
                "op_type": conv.op_type,
                "group": match.group,
                "mode": match.mode,
                "depthwise": match.geometry.is_depthwise,
                "flop_multiplier": match.group if match.mode == "dense" else 1,
                "notes": [match.note] if match.note else [],
            }
        )
        return [{"summary": summary, "details": details}]


# --------------------------------------------------------------------------------- helpers


def _check_channels(conv: ir.Node, geometry: ConvGeometry, bias: np.ndarray | None) -> None:
    """The weight's rows must divide into the groups and agree with the bias and the input."""
    group = geometry.group
    if geometry.transpose:
        divided, what = geometry.in_channels, "input"
    else:
        divided, what = geometry.out_channels, "output"
    if divided % group:
        raise Refusal(f"{divided} {what} channels do not divide into {group} groups", conv)
    if bias is not None and bias.shape != (geometry.out_channels,):
        raise Refusal(
            f"bias shape {list(bias.shape)} does not match {geometry.out_channels} outputs", conv
        )
    shape = conv.inputs[0].shape
    known = shape is not None and len(shape) > 1 and isinstance(shape[1], int)
    if known and shape[1] != geometry.in_channels:
        raise Refusal(
            f"input has {shape[1]} channels but the weight expects {geometry.in_channels}", conv
        )


def _split(match: _Match, scope: Scope, base: str) -> tuple[list[ir.Node], ir.Value, dict]:
    """Split -> one Conv per group -> Concat."""
    conv, geometry, names = match.conv, match.geometry, scope.names
    opset = _onnx_opset(scope.graph, scope.model)
    dequantize = _per_tensor_dequantize(conv)
    source = dequantize.inputs[0] if dequantize is not None else conv.inputs[0]
    split = _split_node(source, geometry, scope, base, opset, before=conv)
    attributes = _branch_attributes(conv)
    out_type = conv.outputs[0].type
    out_shape = _with_channels(conv.outputs[0].shape, geometry.out_per_group)
    branches, outputs = [], []
    for index, part in enumerate(_split_parts(split, conv, scope, base)):
        inputs = _branch_inputs(match, scope, part, index, base)
        branch = ir.node(
            conv.op_type, inputs, attributes=dict(attributes),
            name=names.fresh(f"{base}_g{index}"), num_outputs=1,
        )  # fmt: skip
        branch.outputs[0].name = names.fresh(f"{base}_out{index}")
        branch.outputs[0].type = out_type
        branch.outputs[0].shape = out_shape
        branches.append(branch)
        outputs.append(branch.outputs[0])
    concat = ir.node("Concat", outputs, {"axis": 1}, name=names.fresh(f"{base}_concat"))
    details = {
        "branches": geometry.group,
        "branch_weight_shape": list(match.weight[geometry.weight_rows(0)].shape),
        "split_form": "attribute" if opset < SPLIT_INPUT_OPSET else "input",
        "new_nodes": [split.name, *(b.name for b in branches), concat.name],
    }
    parts = [v.producer() for v in (b.inputs[0] for b in branches) if v.producer() is not split]
    return [split, *parts, *branches, concat], concat.outputs[0], details


def _per_tensor_dequantize(conv: ir.Node) -> ir.Node | None:
    """The per-tensor DequantizeLinear of constant scale feeding a Conv's input, if any.

    Such an input is split in the integer domain, each part dequantized by its own copy
    (``DQ(split(q)) == split(DQ(q))`` exactly), so each branch keeps the Q -> DQ -> Conv form
    that QDQ consumers look for.
    """
    source = conv.inputs[0]
    node = source.producer() if conv.op_type in CONV_OPS else None
    if not is_onnx_op(node, "DequantizeLinear") or attr_int(node, "block_size", 0):
        return None
    params = [const_array(v) if v is not None else None for v in node.inputs[1:3]]
    if params[0] is None or params[0].size != 1:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None and params[1] is None:
        return None
    return node


def _split_parts(split: ir.Node, conv: ir.Node, scope: Scope, base: str) -> list[ir.Value]:
    """The Split's outputs, each dequantized as the Conv's input was when it split integers."""
    dequantize = _per_tensor_dequantize(conv)
    if dequantize is None or split.inputs[0] is not dequantize.inputs[0]:
        return list(split.outputs)
    parts = []
    for index, part in enumerate(split.outputs):
        node = ir.node(
            "DequantizeLinear", [part, *dequantize.inputs[1:]],
            attributes=dict(dequantize.attributes), name=scope.names.fresh(f"{base}_dq{index}"),
        )  # fmt: skip
        node.outputs[0].name = scope.names.fresh(f"{base}_in{index}_dequantized")
        node.outputs[0].type = conv.inputs[0].type
        node.outputs[0].shape = _with_channels(
            conv.inputs[0].shape, part.shape[1] if part.shape else 0
        )
        parts.append(node.outputs[0])
    return parts


def _branch_inputs(
    match: _Match, scope: Scope, part: ir.Value, index: int, base: str
) -> list[ir.Value]:
    """Group ``index``'s inputs: its input part, weight and bias (quantized as they were)."""
    conv, geometry, names = match.conv, match.geometry, scope.names
    rows = geometry.weight_rows(index)
    channels = geometry.output_range(index)
    outs = slice(channels.start, channels.stop)

    def constant(array: np.ndarray, label: str) -> ir.Value:
        return add_constant(scope.graph, np.ascontiguousarray(array),
                            names.fresh(f"{base}.{label}_g{index}"),
                            as_node=scope.in_function, before=conv)  # fmt: skip

    def dequantized(quant: QuantConst, label: str) -> ir.Value:
        return add_dequantized(scope.graph, quant, f"{base}.{label}_g{index}",
                               as_node=scope.in_function, before=conv, names=names)  # fmt: skip

    if conv.op_type == "ConvInteger":
        weight = match.weight_q.rows(rows)
        inputs = [part, constant(weight.values, "weight")]
        if len(conv.inputs) > 2:
            inputs.append(conv.inputs[2])  # the input's zero point, shared
        if len(conv.inputs) > 3 and conv.inputs[3] is not None:
            shared = weight.axis is None
            inputs.append(conv.inputs[3] if shared else constant(weight.zero_point, "weight_zp"))
        return inputs
    if conv.op_type == "QLinearConv":
        weight = match.weight_q.rows(rows)
        shared = weight.axis is None  # one scale and zero point for every group: reuse them
        inputs = [
            part, *conv.inputs[1:3], constant(weight.values, "weight"),
            conv.inputs[4] if shared else constant(weight.scale, "weight_scale"),
            conv.inputs[5] if shared else constant(weight.zero_point, "weight_zero_point"),
            *conv.inputs[6:8],
        ]  # fmt: skip
        if match.bias is not None:
            inputs.append(constant(match.bias[outs], "bias"))
        return inputs
    if match.weight_q is not None:
        inputs = [part, dequantized(match.weight_q.rows(rows), "weight")]
    else:
        inputs = [part, constant(match.weight[rows], "weight")]
    if match.bias_q is not None:
        inputs.append(dequantized(match.bias_q.rows(outs), "bias"))
    elif match.bias is not None:
        inputs.append(constant(match.bias[outs], "bias"))
    return inputs


def _split_node(
    source: ir.Value, geometry: ConvGeometry, scope: Scope, base: str, opset: int, before: ir.Node
) -> ir.Node:
    """A channel Split of ``source`` into the groups' inputs, in the form ``opset`` expects."""
    names = scope.names
    sizes = [geometry.in_per_group] * geometry.group
    if opset < SPLIT_INPUT_OPSET:
        split = ir.node(
            "Split", [source], {"axis": 1, "split": sizes}, name=names.fresh(f"{base}_split"),
            num_outputs=geometry.group,
        )  # fmt: skip
    else:
        sizes_value = add_constant(
            scope.graph, np.array(sizes, np.int64), names.fresh(f"{base}.split_sizes"),
            as_node=scope.in_function, before=before,
        )  # fmt: skip
        split = ir.node(
            "Split", [source, sizes_value], {"axis": 1}, name=names.fresh(f"{base}_split"),
            num_outputs=geometry.group,
        )  # fmt: skip
    for index, part in enumerate(split.outputs):
        part.name = names.fresh(f"{base}_in{index}")
        part.type = source.type
        part.shape = _with_channels(source.shape, geometry.in_per_group)
    return split


def _dense(match: _Match, scope: Scope, base: str) -> tuple[list[ir.Node], ir.Value, dict]:
    """One ungrouped convolution with a block-diagonal weight."""
    conv, names = match.conv, scope.names
    if match.weight_q is None:
        weight = block_diagonal_weight(match.weight, match.group, conv.op_type)
        weight_value = add_constant(
            scope.graph, weight, names.fresh(f"{base}.weight"), as_node=scope.in_function,
            before=conv,
        )  # fmt: skip
        inputs = [conv.inputs[0], weight_value]
    else:
        quant = block_diagonal_quantized(match.weight_q, match.group, conv.op_type)
        weight = quant.values
        if conv.op_type == "ConvInteger":
            inputs = [conv.inputs[0], add_constant(
                scope.graph, quant.values, names.fresh(f"{base}.weight"),
                as_node=scope.in_function, before=conv), *conv.inputs[2:]]  # fmt: skip
        elif conv.op_type == "QLinearConv":
            inputs = [*conv.inputs[:3]] + [
                add_constant(scope.graph, array, names.fresh(f"{base}.{label}"),
                             as_node=scope.in_function, before=conv)
                for array, label in ((quant.values, "weight"), (quant.scale, "weight_scale"),
                                     (quant.zero_point, "weight_zero_point"))
            ] + [*conv.inputs[6:8]]  # fmt: skip
        else:
            inputs = [conv.inputs[0], add_dequantized(
                scope.graph, quant, f"{base}.weight", as_node=scope.in_function, before=conv,
                names=names)]  # fmt: skip
    if match.bias is not None:
        # The bias does not depend on the grouping.
        inputs.append(conv.inputs[bias_input(conv)])
    dense = ir.node(
        conv.op_type, inputs, attributes=_branch_attributes(conv),
        name=base, num_outputs=1,
    )  # fmt: skip
    details = {"weight_shape": list(weight.shape), "new_nodes": [dense.name]}
    return [dense], dense.outputs[0], details


def _branch_attributes(conv: ir.Node) -> dict[str, ir.Attr]:
    """The Conv's attributes for an ungrouped copy of it (output_shape is spatial only)."""
    return {key: attr for key, attr in conv.attributes.items() if key != "group"}


def _with_channels(shape: ir.Shape | None, channels: int) -> ir.Shape | None:
    if shape is None or len(shape) < 2:
        return None
    dims = list(shape)
    dims[1] = channels
    return ir.Shape(dims)


def _onnx_opset(graph: ir.Graph, model: ir.Model) -> int:
    """The ai.onnx opset version that applies to ``graph`` (function bodies have their own)."""
    for imports in (graph.opset_imports, model.opset_imports):
        for domain in ("", "ai.onnx"):
            if domain in imports:
                return imports[domain]
    return model.opset_imports.get("", SPLIT_INPUT_OPSET)
