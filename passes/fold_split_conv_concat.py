"""Fold a channel split, N parallel Convs and a channel Concat into one grouped Conv.

Before::

          ┌─ Conv(W0, b0) ─ [BatchNorm0] ─ [Act] ─┐
    X ─ Split/Slices ─ Conv(W1, b1) ─ [BatchNorm1] ─ [Act] ─ Concat(axis=1) ─ Y
          └─ Conv(W2, b2) ─ [BatchNorm2] ─ [Act] ─┘

After::

    X ─ [Slice(a:b)] ─ Conv(concat(W'0, W'1, W'2), concat(b'0, b'1, b'2), group=3·g) ─ [Act] ─ Y

where W'i, b'i are the branch weights with their BatchNormalization folded in, and g is the
branches' own ``group``. The fold is anchored at the Concat.

A run of branches inside a wider Concat (TorchScript merges nested ``torch.cat``s, so
ShuffleNet v1's ``cat([shortcut, cat(branches)])`` is one Concat) folds in its place::

    Concat(S, Conv0(X[0:c]), Conv1(X[c:2c]), T)  ->  Concat(S, Conv(X, group=2·g), T)

Each maximal run of at least two consecutive inputs whose Convs read channel ranges of one
tensor is a block; every block must meet the conditions below, except that the Concat's other
inputs (S, T) can be anything. A block that does not is reported as skipped, the others fold.

Quantized blocks (QDQ, what ``onnxruntime.quantization`` writes) fold too::

    X ─ Split ─ Q(s_i) ─ DQ(s_i) ─ Conv(DQ(W_i), DQ(B_i)) ─ Q(t_i) ─ DQ(t_i) ─ Concat
  ->
    X ─ Q(s) ─ DQ(s) ─ Conv(DQ(concat W_i), DQ(concat B_i), group) ─ Q(t) ─ DQ(t)

with the weights joined as integers (per-channel scales concatenated; per-tensor ones kept when
equal, else per channel on axis 0, see :mod:`._quant`) and the activation Q/DQ pairs joined
exactly when :mod:`._fold_quant` says (per tensor when every branch has the same scale and zero
point, else per channel on axis 1 from opset 13). QLinearConv branches fold into one QLinearConv
when they share their x and y scales and zero points.

Folds when:
    * every Concat input (of the run) is a Conv (or ConvTranspose) branch, optionally followed
      by an inference BatchNormalization and/or one elementwise activation (SiLU written as
      ``Mul(v, Sigmoid(v))`` counts as one, see :mod:`._activations`), each value inside
      the branch used once; the branch's output may also be used elsewhere (or be a graph
      output): those users then read a Slice of the grouped output, under the output's name
      (this always pays: 1 + S nodes run instead of N + 2, copying at most what the Concat
      did, see :mod:`._fold_cost`);
    * each branch's input is one channel range of the same tensor X: an output of a Split
      (opset 1-11 ``split`` attribute, 13 ``split`` input, 18 ``num_outputs``) or a Slice on
      the channel axis with step 1 (bounds constant, or computed by Shape/Gather/Div/Mul
      arithmetic from a static channel dim);
    * the ranges are equal, non-empty, adjacent and in Concat order; if they cover only
      part of X (a gapped split), one Slice is kept in front of the grouped Conv;
    * the Concat is on the channel axis (1, or -rank+1);
    * the Convs share strides, pads, auto_pad, dilations, kernel and group, and have
      constant weights and biases (initializers or Constant nodes, also through Identity
      chains: TorchScript's second use of a shared weight); or, for Conv only, the kernels or
      dilations differ but
      every branch has the same strides and centred 'same' padding (MixConv: each kernel is
      embedded, zero-padded, in the largest), and ``mixconv`` is "always", or "auto" (the
      default) and the cost estimate of :mod:`._fold_cost` says the folded block is not
      slower (the skip reason or the rewrite summary gives the estimate);
    * every branch has the same activation (op and attributes) or none.

Refuses, leaving the block as it is and recording why: quantization one grouped conv cannot
reproduce (see :mod:`._fold_quant`; a BatchNormalization after a quantized Conv, blocks on axis 0
that end inside a branch, blocked MixConv, quantized and float weights mixed), uneven or empty
parts, a Concat order different from the channel order, overlapping, strided or interior-gapped
slices, a non-channel axis, a value inside a branch used elsewhere or that is a graph output,
differing Conv attributes, a MixConv fold that would be slower or whose sizes are not static
(``"auto"``), non-constant weights, and a channel dim that is symbolic where the ranges depend on
it.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from ._activations import ELEMENTWISE_ACTIVATIONS, activation_after, activation_name
from ._common import (
    Refusal,
    add_constant,
    attr_float,
    const_array,
    is_onnx_op,
    node_label,
    remove_with_dead_producers,
    take_over_value,
)
from ._driver import AnchoredPass, Scope
from ._fold_cost import Estimate, FoldCost, check_mode, estimate, refuse_unless_it_pays
from ._fold_match import Block, Branch, FoldMatch, match_concat
from ._fold_quant import apply_pairs, data_input
from ._quant import QuantConst, add_dequantized, join
from ._shapes import ShapeFacts

__all__ = ["ELEMENTWISE_ACTIVATIONS", "FoldSplitConvConcat"]

logger = logging.getLogger(__name__)

PASS_NAME = "fold-split-conv-concat"


class FoldSplitConvConcat(AnchoredPass):
    """Fold Split/Slice -> N x Conv -> Concat blocks into one Conv with ``group=N``.

    After a call, ``rewrites`` lists the folded blocks and ``skips`` the candidate blocks left
    alone with the reason.

    Args:
        mixconv: Blocks whose kernels differ but share centred 'same' padding (MixConv, mixed
            dilations), folded by embedding every kernel in the largest grid: ``"auto"`` folds
            them when the cost estimate says the result is not slower (see
            :mod:`._fold_cost`), ``"always"`` folds them, ``"never"`` leaves them. True and
            False mean "always" and "never".
        cost: The target's prices for that estimate (default: onnxruntime CPU / llvm).
        subgraphs: Also fold inside If/Loop/Scan bodies.
        functions: Also fold inside model-local functions.
    """

    pass_name = PASS_NAME

    def __init__(
        self,
        *,
        mixconv: str | bool = "auto",
        cost: FoldCost | None = None,
        subgraphs: bool = True,
        functions: bool = True,
    ):
        super().__init__(subgraphs=subgraphs, functions=functions)
        self.mixconv = check_mode(mixconv)
        self.cost = cost or FoldCost()
        self._opset = 1
        self._facts: ShapeFacts | None = None

    def _begin(self, model: ir.Model) -> None:
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self._facts = ShapeFacts(model)

    def _is_anchor(self, node: ir.Node) -> bool:
        return is_onnx_op(node, "Concat")

    def _match(self, node: ir.Node) -> FoldMatch | None:
        embed = self.mixconv != "never"
        match = match_concat(node, self._facts, mixconv=embed, opset=self._opset)
        if match is None:
            return None
        kept = []
        for block in match.blocks:
            try:
                self._check_cost(block)
                kept.append(block)
            except Refusal as refusal:
                if match.whole:
                    raise
                match.refusals.append(refusal)
        if not kept:
            raise match.refusals[0]
        match.blocks = kept
        return match

    def _check_cost(self, block: Block) -> None:
        """Raise unless the fold pays (MixConv in "auto" mode); note the estimate otherwise.

        A block that adds no multiply-adds always pays: it runs 1 + S nodes instead of N + 2
        (S <= N Slices for outputs used elsewhere) and copies at most what the Concat did.
        """
        if not block.mixconv and not block.shared:
            return
        found = self._estimate(block)
        block.notes = []
        if block.mixconv and self.mixconv == "auto":
            refuse_unless_it_pays(found, "MixConv fold (kernels embedded in one grid)")
            block.notes.append(f"mixconv='auto': the fold pays, {found.summary()}")
        elif block.mixconv:
            block.notes.append("mixconv='always': folded without weighing its cost")
        if block.shared:
            which = ", ".join(str(i) for i in block.shared)
            block.notes.append(f"branch output(s) {which} also used elsewhere: read from a Slice")

    def _estimate(self, block: Block) -> Estimate | None:
        """The cost estimate of ``block``, or None when a size it needs is not static."""
        sizes = []
        for branch in block.branches:
            elements = []
            for value in (data_input(branch.conv), branch.conv.outputs[0]):
                rank = self._facts.rank(value)
                dims = [self._facts.static_dim(value, a) for a in range(1, rank or 0)]
                if rank is None or any(d is None for d in dims):
                    return None
                batch = self._facts.static_dim(value, 0) or 1
                elements.append(batch * math.prod(dims))
            per_group = branch.geometry.in_per_group
            sizes.append((*elements, per_group, math.prod(branch.attrs.kernel)))
        grid = math.prod(block.branches[0].attrs.kernel)
        if block.mixconv:
            _, shape = _embed_kernels(block.branches, [b.weight[:1, :1] for b in block.branches])
            grid = math.prod(shape.kernel)
        return estimate(sizes, grid, block.shared, self.cost)

    def _rewrite(self, match: FoldMatch, scope: Scope) -> list[dict]:
        concat = match.concat
        if match.whole:
            (block,) = match.blocks
            result, doomed, record = self._fold_block(block, concat, scope, like=concat.outputs[0])
            # The result takes over the Concat output's name, so value_info and graph outputs hold.
            take_over_value(concat.outputs[0], result, scope.names, "folded")
            remove_with_dead_producers(scope.graph, [concat, *doomed])
            return [record]
        records, results, doomed = [], [], []
        for block in match.blocks:
            result, block_doomed, record = self._fold_block(block, concat, scope, like=None)
            record["summary"] += (
                f"; Concat inputs {block.run.start}-{block.run.stop - 1} of "
                f"{len(concat.inputs)}, the others stay"
            )
            record["details"]["concat_inputs"] = [block.run.start, block.run.stop]
            records.append(record)
            results.append((block.run, result))
            doomed.extend(block_doomed)
        _replace_runs(concat, results)
        remove_with_dead_producers(scope.graph, doomed)
        return records

    def _fold_block(
        self, block: Block, concat: ir.Node, scope: Scope, like: ir.Value | None
    ) -> tuple[ir.Value, list[ir.Node], dict]:
        """Insert the block's grouped Conv before ``concat``: (its result, the branch nodes it
        replaces, the record). ``like``: the value the result will replace (None: a run)."""
        first = block.branches[0]
        op_type = first.geometry.op_type
        conv, notes = self._grouped_conv(block, concat, scope)
        notes.extend(block.notes)
        result = conv.outputs[0]
        new_nodes = [conv]
        run_result = like is None
        if run_result:
            like = _run_value(concat, block.run, first.geometry.out_channels * len(block.branches))
        activation = first.activation
        if activation is not None:
            moved = activation_after(activation, result, like, scope, conv.name)
            new_nodes.extend(moved)
            result = moved[-1].outputs[0]
            notes.append(f"{activation_name(activation)} moved after the grouped {op_type}")
        if block.output_params:  # the branches' output Q/DQ, joined
            widths = [b.geometry.out_channels for b in block.branches]
            if result.name is None:
                result.name = scope.names.fresh(f"{conv.name}_out")
            result.type, result.shape = like.type, like.shape
            result, nodes, quant_notes = apply_pairs(
                result, block.output_params, widths, scope, concat, f"{conv.name}_output"
            )
            new_nodes.extend(nodes)
            notes.extend(f"output {note}" for note in quant_notes)
        if run_result:  # named here: the Concat keeps its output
            result.name = scope.names.fresh(f"{conv.name}_{'act_' if activation else ''}out")
            result.type, result.shape = like.type, like.shape
        scope.graph.insert_before(concat, new_nodes)
        if block.shared:
            self._serve_shared(block, concat, result, scope, conv.name)
        doomed = [
            node
            for branch in block.branches
            for node in (*branch.output_qdq, branch.activation, branch.batch_norm, branch.conv)
            if node is not None
        ]
        return result, doomed, _record(block, conv, notes)

    def _grouped_conv(
        self, block: Block, concat: ir.Node, scope: Scope
    ) -> tuple[ir.Node, list[str]]:
        """The one grouped Conv (not yet in the graph) and the notes on how it was made."""
        branches = block.branches
        first = branches[0]
        notes: list[str] = []
        attributes = {key: attr for key, attr in first.conv.attributes.items() if key != "group"}
        attributes["group"] = ir.AttrInt64("group", len(branches) * first.attrs.group)
        names = scope.names
        base = names.fresh(f"{first.conv.name or 'conv'}_grouped")
        weight_inputs = _weight_inputs(block, attributes, notes, scope, base, concat)
        source = block.source
        lo, hi = block.window
        if (lo, hi) != (0, block.channels):
            source = self._insert_window_slice(block, concat, scope, base)
            notes.append(
                f"gapped split: keeps channels [{lo}:{hi}) of {block.channels} by one Slice"
            )
        if block.input_params:  # the branches' input Q/DQ, joined
            widths = [b.geometry.in_channels for b in branches]
            source, nodes, quant_notes = apply_pairs(
                source, block.input_params, widths, scope, concat, f"{base}_input"
            )
            scope.graph.insert_before(concat, nodes)
            notes.extend(f"input {note}" for note in quant_notes)
        op_type = first.conv.op_type
        if op_type == "QLinearConv":
            x_params, y_params = first.conv.inputs[1:3], first.conv.inputs[6:8]
            inputs = [source, *x_params, *weight_inputs[:3], *y_params, *weight_inputs[3:]]
        else:
            inputs = [source, *weight_inputs]
        conv = ir.node(op_type, inputs, attributes=attributes, name=base, num_outputs=1)
        return conv, notes

    def _insert_window_slice(
        self, block: Block, concat: ir.Node, scope: Scope, base: str
    ) -> ir.Value:
        lo, hi = block.window
        return _insert_channel_slice(
            block.source, lo, hi, scope, concat, f"{base}_window", self._opset
        )

    def _serve_shared(
        self, block: Block, concat: ir.Node, result: ir.Value, scope: Scope, base: str
    ) -> None:
        """Branch outputs used elsewhere become Slices of the grouped result (same names)."""
        width = block.branches[0].geometry.out_channels
        for index in block.shared:
            old = concat.inputs[block.run.start + index]
            lo = index * width
            part = _insert_channel_slice(
                result, lo, lo + width, scope, concat, f"{base}_part{index}", self._opset
            )
            take_over_value(old, part, scope.names, "folded")
        scope.graph.sort()  # a consumer may come before the Concat, and now reads the Slice


# --------------------------------------------------------------------------------- helpers


def _weight_inputs(
    block: Block, attributes: dict, notes: list[str], scope: Scope, base: str, before: ir.Node
) -> list[ir.Value]:
    """The grouped conv's weight and bias inputs (QLinearConv: weight, its scale and zero
    point, bias), quantized as the branches' were."""
    branches = block.branches
    first = branches[0]

    def constant(array: np.ndarray, label: str) -> ir.Value:
        return add_constant(scope.graph, np.ascontiguousarray(array),
                            scope.names.fresh(f"{base}.{label}"), as_node=scope.in_function,
                            before=before)  # fmt: skip

    def dequantized(quant: QuantConst, label: str) -> ir.Value:
        return add_dequantized(scope.graph, quant, f"{base}.{label}", as_node=scope.in_function,
                               before=before, names=scope.names)  # fmt: skip

    if first.weight_q is None:
        weights, biases = zip(*(_weights_with_batch_norm(b) for b in branches))
        if any(b.batch_norm is not None for b in branches):
            notes.append("BatchNormalization folded")
        weight = np.concatenate(_mixconv(block, list(weights), attributes, notes), axis=0)
        inputs = [constant(weight, "weight")]
        if any(b is not None for b in biases):
            inputs.append(constant(_joined_bias(branches, biases, weight.dtype), "bias"))
        return inputs
    quants = [b.weight_q for b in branches]
    if block.mixconv:  # off the branch's kernel, the grid holds the zero point
        centred = [q.values.astype(np.int64) - q.zero_points().astype(np.int64) for q in quants]
        embedded = _mixconv(block, centred, attributes, notes)
        quants = [dataclasses.replace(q, values=(e + q.zero_points()).astype(q.values.dtype))
                  for q, e in zip(quants, embedded)]  # fmt: skip
    weight = join(quants, "branch weights")
    biases = [b.bias for b in branches]
    if first.conv.op_type == "QLinearConv":
        inputs = [constant(weight.values, "weight"), constant(weight.scale, "weight_scale"),
                  constant(weight.zero_point, "weight_zero_point")]  # fmt: skip
        if any(b is not None for b in biases):
            inputs.append(constant(_joined_bias(branches, biases, np.int32), "bias"))
        return inputs
    inputs = [dequantized(weight, "weight")]
    if first.bias_q is not None:
        inputs.append(dequantized(join([b.bias_q for b in branches], "branch biases"), "bias"))
    elif any(b is not None for b in biases):
        inputs.append(constant(_joined_bias(branches, biases, weight.scale.dtype), "bias"))
    return inputs


def _joined_bias(branches: list[Branch], biases, dtype) -> np.ndarray:
    """The branches' biases end to end, zeros for a branch without one."""
    return np.concatenate(
        [np.zeros(b.geometry.out_channels, dtype) if bias is None else bias
         for b, bias in zip(branches, biases)]
    ).astype(dtype)  # fmt: skip


def _mixconv(
    block: Block, weights: list[np.ndarray], attributes: dict, notes: list[str]
) -> list[np.ndarray]:
    """MixConv: the weights embedded (zero-padded) in one grid, which the attributes take."""
    if not block.mixconv:
        return weights
    weights, grid = _embed_kernels(block.branches, weights)
    attributes.pop("auto_pad", None)
    attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", grid.kernel)
    attributes["dilations"] = ir.AttrInt64s("dilations", grid.dilations)
    attributes["pads"] = ir.AttrInt64s("pads", grid.pads)
    notes.append(
        "MixConv: kernels embedded in one "
        f"{'x'.join(map(str, grid.kernel))} grid (dilation {list(grid.dilations)})"
    )
    return weights


def _insert_channel_slice(
    source: ir.Value, lo: int, hi: int, scope: Scope, before: ir.Node, base: str, opset: int
) -> ir.Value:
    """Channels [lo, hi) of ``source`` by one Slice inserted before ``before``; its output."""
    names = scope.names
    name = names.fresh(base)
    if opset < 10:  # Slice-1 takes its bounds as attributes
        attributes = {"starts": [lo], "ends": [hi], "axes": [1]}
        node = ir.node("Slice", [source], attributes=attributes, name=name)
    else:
        bounds = (("starts", lo), ("ends", hi), ("axes", 1), ("steps", 1))
        consts = [
            add_constant(scope.graph, np.array([v], np.int64), names.fresh(f"{base}_{label}"),
                         as_node=scope.in_function, before=before)
            for label, v in bounds
        ]  # fmt: skip
        node = ir.node("Slice", [source, *consts], name=name)
    node.outputs[0].name = names.fresh(f"{base}_out")
    scope.graph.insert_before(before, node)
    return node.outputs[0]


def _run_value(concat: ir.Node, run: range, channels: int) -> ir.Value:
    """An unnamed value with the type, and the shape with ``channels``, of a run's result."""
    sample = concat.inputs[run.start]
    shape = None
    if sample.shape is not None and len(sample.shape) > 1:
        dims = list(sample.shape)
        dims[1] = channels
        shape = ir.Shape(dims)
    return ir.Value(name=None, type=sample.type, shape=shape)


def _replace_runs(concat: ir.Node, results: list[tuple[range, ir.Value]]) -> None:
    """Feed each run's result to ``concat`` in place of the run's inputs."""
    inputs = list(concat.inputs)
    starts = {run.start: (run, value) for run, value in results}
    new_inputs, index = [], 0
    while index < len(inputs):
        if index in starts:
            run, value = starts[index]
            new_inputs.append(value)
            index = run.stop
        else:
            new_inputs.append(inputs[index])
            index += 1
    for index in range(len(inputs)):
        concat.replace_input_with(index, None)
    concat.resize_inputs(len(new_inputs))
    for index, value in enumerate(new_inputs):
        concat.replace_input_with(index, value)


def _record(block: Block, conv: ir.Node, notes: list[str]) -> dict:
    branches = block.branches
    op_type = conv.op_type
    n = len(branches)
    group = conv.attributes["group"].as_int()
    weight_shape = [int(d) for d in conv.inputs[3 if op_type == "QLinearConv" else 1].shape]
    splitters = sorted({b.splitter.op_type for b in branches if b.splitter is not None})
    summary = (
        f"{n} x {op_type} -> one {op_type}(group={group}), weight {weight_shape}"
        f" (from {'/'.join(splitters)})"
    )
    if notes:
        summary += "; " + "; ".join(notes)
    return {
        "summary": summary,
        "details": {
            "branches": n,
            "op_type": op_type,
            "group": group,
            "weight_shape": weight_shape,
            "split_by": splitters,
            "branch_convs": [node_label(b.conv) for b in branches],
            "new_node": conv.name,
            "notes": notes,
        },
    }


def _weights_with_batch_norm(branch: Branch) -> tuple[np.ndarray, np.ndarray | None]:
    """The branch's weight and bias with its BatchNormalization folded in (float64 math)."""
    weight, bias = branch.weight, branch.bias
    bn = branch.batch_norm
    if bn is None:
        return weight, bias
    params = [const_array(v) for v in bn.inputs[1:5]]  # proven constant by matching
    scale, offset, mean, var = (p.astype(np.float64) for p in params)
    factor = scale / np.sqrt(var + attr_float(bn, "epsilon", 1e-5))
    w64 = weight.astype(np.float64)
    geometry = branch.geometry
    if not geometry.transpose:
        w64 = w64 * factor.reshape((-1,) + (1,) * (w64.ndim - 1))
    else:  # ConvTranspose: group i's rows hold its output channels on axis 1
        spatial = (1,) * (w64.ndim - 2)
        for index in range(geometry.group):
            outputs = geometry.output_range(index)
            w64[geometry.weight_rows(index)] *= factor[outputs.start : outputs.stop].reshape(
                (1, -1, *spatial)
            )
    b64 = bias.astype(np.float64) if bias is not None else np.zeros_like(mean)
    b64 = (b64 - mean) * factor + offset
    return w64.astype(weight.dtype), b64.astype(weight.dtype)


@dataclasses.dataclass
class _Grid:
    kernel: list[int]
    dilations: list[int]
    pads: list[int]


def _embed_kernels(
    branches: list[Branch], weights: list[np.ndarray]
) -> tuple[list[np.ndarray], _Grid]:
    """Place every branch kernel, centred and zero-padded, on one shared grid (per axis)."""
    rank = branches[0].attrs.spatial_rank
    kernel, dilations = [], []
    positions: list[list[np.ndarray]] = [[] for _ in branches]
    for axis in range(rank):
        ks = [b.attrs.kernel[axis] for b in branches]
        ds = [b.attrs.dilations[axis] for b in branches]
        big = max(ks)
        if len(set(ds)) == 1 and all((big - k) % 2 == 0 for k in ks):
            kernel.append(big)
            dilations.append(ds[0])
            for i, k in enumerate(ks):
                positions[i].append((big - k) // 2 + np.arange(k))
        else:  # different dilations: embed on the dense grid of the largest effective kernel
            effective = [d * (k - 1) + 1 for k, d in zip(ks, ds)]
            big = max(effective)
            kernel.append(big)
            dilations.append(1)
            for i, (k, d, e) in enumerate(zip(ks, ds, effective)):
                positions[i].append((big - e) // 2 + d * np.arange(k))
    embedded = []
    for weight, where in zip(weights, positions):
        grid = np.zeros(weight.shape[:2] + tuple(kernel), dtype=weight.dtype)
        grid[(slice(None), slice(None), *np.ix_(*where))] = weight
        embedded.append(grid)
    pads = [d * (k - 1) // 2 for k, d in zip(kernel, dilations)]
    return embedded, _Grid(kernel, dilations, pads + pads)
