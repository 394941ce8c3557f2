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

Every other attribute (kernel_shape, strides, pads, auto_pad, dilations, output_padding,
output_shape) is kept on each new convolution, so every padding form, 1-D to 3-D kernels and
symbolic batch or spatial dims carry over. The rewrite is anchored at the Conv and its result
takes over the Conv output's name, type and shape.

Expands when:
    * the node is an ONNX Conv or ConvTranspose (of the op types asked for) with ``group > 1``;
    * its weight (and bias, if any) are constants: initializers not also graph inputs, or
      Constant nodes;
    * the weight's channel counts divide into the groups and agree with the input's static
      channel dim, when it has one;
    * the options allow it: the node is not named in ``skip``, ``min_group <= group <=
      max_group``, and it is not a depthwise conv (``group == C_in``) while ``keep_depthwise``.

Refuses, leaving the node as it is and recording why: a weight or bias that is computed or
can be fed at run time, channel counts that do not divide by the group, an input whose
channels disagree with the weight, and every case the options exclude.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from ._common import (
    CONV_OPS,
    ConvAttrs,
    NameScope,
    Refusal,
    Rewrite,
    Skip,
    add_constant,
    attr_int,
    const_array,
    conv_attrs,
    function_graphs,
    graph_scopes,
    is_onnx_op,
    node_label,
    remove_with_dead_producers,
    take_over_value,
)

logger = logging.getLogger(__name__)

PASS_NAME = "expand-grouped-conv"
MODES = ("split", "dense")
# Dense expansion does `group` times the multiply-adds; from this factor on it is worth a warning.
LARGE_DENSE_MULTIPLIER = 4.0
# Split changed from a `split` attribute to a `split` input in opset 13.
SPLIT_INPUT_OPSET = 13


@dataclasses.dataclass
class _Match:
    conv: ir.Node
    attrs: ConvAttrs
    weight: np.ndarray
    bias: np.ndarray | None
    channels_in: int
    channels_out: int
    mode: str
    note: str | None = None

    @property
    def group(self) -> int:
        return self.attrs.group

    @property
    def depthwise(self) -> bool:
        return self.group == self.channels_in


class ExpandGroupedConv(ir.passes.InPlacePass):
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
        subgraphs: Also expand inside If/Loop/Scan bodies.
        functions: Also expand inside model-local functions.
    """

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
        subgraphs: bool = True,
        functions: bool = True,
    ):
        super().__init__()
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
        self.subgraphs = subgraphs
        self.functions = functions
        self.rewrites: list[Rewrite] = []
        self.skips: list[Skip] = []
        self.warnings: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = []
        self.skips = []
        self.warnings = []
        names = NameScope(model)
        in_functions = function_graphs(model)
        for scope, graph, in_function in graph_scopes(model):
            if in_function and not self.functions:
                continue
            if graph is not model.graph and not in_function and not self.subgraphs:
                continue
            opset = _onnx_opset(graph, model)
            for node in [n for n in graph if is_onnx_op(n, *self.op_types)]:
                try:
                    match = self._match(node)
                except Refusal as refusal:
                    self.skips.append(Skip(PASS_NAME, scope, node_label(node), str(refusal)))
                    logger.debug("skip %s: %s", node_label(node), refusal)
                    continue
                if match is None:
                    continue
                record = self._rewrite(match, graph, names, id(graph) in in_functions, opset)
                self.rewrites.append(Rewrite(PASS_NAME, scope, node_label(node), **record))
        return ir.passes.PassResult(model, modified=bool(self.rewrites))

    # ----------------------------------------------------------------------------- matching

    def _match(self, conv: ir.Node) -> _Match | None:
        """The expansion of ``conv``; None if it is not grouped at all."""
        group = attr_int(conv, "group", 1)
        if group <= 1:
            return None
        if conv.name and conv.name in self.skip:
            raise Refusal("named in the skip list")
        if len(conv.inputs) < 2 or conv.inputs[1] is None or conv.inputs[0] is None:
            raise Refusal(f"{node_label(conv)} has no data or weight input")
        weight = const_array(conv.inputs[1])
        if weight is None:
            raise Refusal(f"weight of {node_label(conv)} is not a constant")
        if weight.ndim < 3:
            raise Refusal(f"{node_label(conv)} has a weight of rank {weight.ndim}")
        bias = None
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            bias = const_array(conv.inputs[2])
            if bias is None:
                raise Refusal(f"bias of {node_label(conv)} is not a constant")
        attrs = conv_attrs(conv, weight.shape)
        if conv.op_type == "Conv":
            channels_in, channels_out = weight.shape[1] * group, weight.shape[0]
            divided, what = weight.shape[0], "output"
        else:
            channels_in, channels_out = weight.shape[0], weight.shape[1] * group
            divided, what = weight.shape[0], "input"
        if divided % group:
            raise Refusal(f"{divided} {what} channels do not divide into {group} groups")
        if bias is not None and bias.shape != (channels_out,):
            raise Refusal(f"bias shape {list(bias.shape)} does not match {channels_out} outputs")
        shape = conv.inputs[0].shape
        known = shape is not None and len(shape) > 1 and isinstance(shape[1], int)
        if known and shape[1] != channels_in:
            raise Refusal(f"input has {shape[1]} channels but the weight expects {channels_in}")
        match = _Match(conv, attrs, weight, bias, channels_in, channels_out, self.mode)
        if self.keep_depthwise and match.depthwise:
            raise Refusal(f"depthwise (group {group} == {channels_in} input channels): kept")
        if self.min_group is not None and group < self.min_group:
            raise Refusal(f"group {group} is below the minimum {self.min_group}: kept")
        if self.max_group is not None and group > self.max_group:
            raise Refusal(f"group {group} is above the maximum {self.max_group}: kept")
        limit = self.max_dense_multiplier
        if match.mode == "dense" and limit is not None and group > limit:
            match.mode = "split"
            match.note = (
                f"split instead of dense: a dense {conv.op_type} would do {group}x the work "
                f"(limit {limit:g}x)"
            )
        return match

    # ----------------------------------------------------------------------------- rewriting

    def _rewrite(
        self, match: _Match, graph: ir.Graph, names: NameScope, in_function: bool, opset: int
    ) -> dict:
        conv = match.conv
        base = names.fresh(f"{conv.name or conv.op_type.lower()}_expanded")
        if match.mode == "split":
            new_nodes, result, details = self._split(match, graph, names, in_function, opset, base)
            summary = (
                f"{conv.op_type}(group={match.group}) -> Split -> {match.group} x "
                f"{conv.op_type}, weight {list(details['branch_weight_shape'])} each -> Concat"
            )
        else:
            new_nodes, result, details = self._dense(match, graph, names, in_function, base)
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
        graph.insert_before(conv, new_nodes)

        # The result takes over the Conv output's name, so value_info and graph outputs hold.
        take_over_value(conv.outputs[0], result, names, "expanded")
        remove_with_dead_producers(graph, [conv])
        details.update(
            {
                "op_type": conv.op_type,
                "group": match.group,
                "mode": match.mode,
                "depthwise": match.depthwise,
                "flop_multiplier": match.group if match.mode == "dense" else 1,
                "notes": [match.note] if match.note else [],
            }
        )
        return {"summary": summary, "details": details}

    def _split(
        self,
        match: _Match,
        graph: ir.Graph,
        names: NameScope,
        in_function: bool,
        opset: int,
        base: str,
    ) -> tuple[list[ir.Node], ir.Value, dict]:
        conv = match.conv
        group = match.group
        source = conv.inputs[0]
        width_in = match.channels_in // group
        width_out = match.channels_out // group
        sizes = [width_in] * group
        if opset < SPLIT_INPUT_OPSET:
            split = ir.node(
                "Split", [source], {"axis": 1, "split": sizes}, name=names.fresh(f"{base}_split"),
                num_outputs=group,
            )  # fmt: skip
        else:
            sizes_value = add_constant(
                graph, np.array(sizes, np.int64), names.fresh(f"{base}.split_sizes"),
                as_node=in_function, before=conv,
            )  # fmt: skip
            split = ir.node(
                "Split", [source, sizes_value], {"axis": 1}, name=names.fresh(f"{base}_split"),
                num_outputs=group,
            )  # fmt: skip
        for index, part in enumerate(split.outputs):
            part.name = names.fresh(f"{base}_in{index}")
            part.type = source.type
            part.shape = _with_channels(source.shape, width_in)

        attributes = _branch_attributes(conv)
        out_type, out_shape = conv.outputs[0].type, _with_channels(conv.outputs[0].shape, width_out)
        branches, outputs = [], []
        for index, part in enumerate(split.outputs):
            # Conv weights hold output channels on axis 0, ConvTranspose weights input channels.
            width = width_out if conv.op_type == "Conv" else width_in
            weight = np.ascontiguousarray(match.weight[index * width : (index + 1) * width])
            inputs = [
                part,
                add_constant(graph, weight, names.fresh(f"{base}.weight_g{index}"),
                             as_node=in_function, before=conv),
            ]  # fmt: skip
            if match.bias is not None:
                bias = np.ascontiguousarray(match.bias[index * width_out : (index + 1) * width_out])
                inputs.append(
                    add_constant(graph, bias, names.fresh(f"{base}.bias_g{index}"),
                                 as_node=in_function, before=conv)
                )  # fmt: skip
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
            "branches": group,
            "branch_weight_shape": list(branches[0].inputs[1].shape),
            "split_form": "attribute" if opset < SPLIT_INPUT_OPSET else "input",
            "new_nodes": [split.name, *(b.name for b in branches), concat.name],
        }
        return [split, *branches, concat], concat.outputs[0], details

    def _dense(
        self, match: _Match, graph: ir.Graph, names: NameScope, in_function: bool, base: str
    ) -> tuple[list[ir.Node], ir.Value, dict]:
        conv = match.conv
        weight = block_diagonal_weight(match.weight, match.group)
        weight_value = add_constant(
            graph, weight, names.fresh(f"{base}.weight"), as_node=in_function, before=conv
        )
        inputs = [conv.inputs[0], weight_value]
        if match.bias is not None:
            inputs.append(conv.inputs[2])  # the bias does not depend on the grouping
        dense = ir.node(
            conv.op_type, inputs, attributes=_branch_attributes(conv),
            name=base, num_outputs=1,
        )  # fmt: skip
        details = {"weight_shape": list(weight.shape), "new_nodes": [dense.name]}
        return [dense], dense.outputs[0], details


# --------------------------------------------------------------------------------- helpers


def block_diagonal_weight(weight: np.ndarray, group: int) -> np.ndarray:
    """The ungrouped weight equal to a grouped one: each group's block, zeros elsewhere.

    Both layouts hold the axis that is split into groups first, so one function serves both.

    Args:
        weight: ``[C_out, C_in/G, k...]`` for Conv, ``[C_in, C_out/G, k...]`` for ConvTranspose.
        group: G.

    Returns:
        ``[C_out, C_in, k...]`` for Conv, ``[C_in, C_out, k...]`` for ConvTranspose.
    """
    rows, cols = weight.shape[0], weight.shape[1]
    rows_per_group = rows // group
    dense = np.zeros((rows, cols * group, *weight.shape[2:]), dtype=weight.dtype)
    for index in range(group):
        rows_slice = slice(index * rows_per_group, (index + 1) * rows_per_group)
        dense[rows_slice, index * cols : (index + 1) * cols] = weight[rows_slice]
    return dense


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
