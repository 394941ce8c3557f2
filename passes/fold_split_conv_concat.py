"""Fold a channel split, N parallel Convs and a channel Concat into one grouped Conv.

Before::

          ┌─ Conv(W0, b0) ─ [BatchNorm0] ─ [Act] ─┐
    X ─ Split/Slices ─ Conv(W1, b1) ─ [BatchNorm1] ─ [Act] ─ Concat(axis=1) ─ Y
          └─ Conv(W2, b2) ─ [BatchNorm2] ─ [Act] ─┘

After::

    X ─ [Slice(a:b)] ─ Conv(concat(W'0, W'1, W'2), concat(b'0, b'1, b'2), group=3·g) ─ [Act] ─ Y

where W'i, b'i are the branch weights with their BatchNormalization folded in, and g is the
branches' own ``group``. The fold is anchored at the Concat.

Folds when:
    * every Concat input is a Conv (or ConvTranspose) branch, optionally followed by an
      inference BatchNormalization and/or one elementwise activation, each value used once;
    * each branch's input is one channel range of the same tensor X: an output of a Split
      (opset 1-11 ``split`` attribute, 13 ``split`` input, 18 ``num_outputs``) or a Slice on
      the channel axis with step 1 (bounds constant, or computed by Shape/Gather/Div/Mul
      arithmetic from a static channel dim);
    * the ranges are equal, non-empty, adjacent and in Concat order; if they cover only
      part of X (a gapped split), one Slice is kept in front of the grouped Conv;
    * the Concat is on the channel axis (1, or -rank+1);
    * the Convs share strides, pads, auto_pad, dilations, kernel and group, and have
      constant weights and biases; or, for Conv only, the kernels or dilations differ but
      every branch has the same strides and centred 'same' padding (MixConv: each kernel is
      embedded, zero-padded, in the largest);
    * every branch has the same activation (op and attributes) or none.

Refuses, leaving the block as it is and recording why: uneven or empty parts, a Concat order
different from the channel order, overlapping, strided or interior-gapped slices, a non-channel
axis, a branch value used elsewhere or that is a graph output, differing Conv attributes,
non-constant weights, and a channel dim that is symbolic where the ranges depend on it.
"""

from __future__ import annotations

import dataclasses
import logging

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
    attr_float,
    attr_int,
    const_array,
    conv_attrs,
    function_graphs,
    graph_scopes,
    int_list,
    is_onnx_op,
    node_label,
    remove_with_dead_producers,
    take_over_value,
)
from ._shapes import ShapeFacts

logger = logging.getLogger(__name__)

PASS_NAME = "fold-split-conv-concat"

# Unary elementwise ops that act on each element alone, so f(concat(a, b)) == concat(f(a), f(b)).
ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSwish", "HardSigmoid", "Elu",
        "Selu", "Celu", "Softplus", "Softsign", "Mish", "Gelu", "ThresholdedRelu", "Abs",
        "Neg", "Exp", "Erf", "Identity",
    }
)  # fmt: skip


@dataclasses.dataclass
class _Branch:
    conv: ir.Node
    batch_norm: ir.Node | None
    activation: ir.Node | None
    weight: np.ndarray
    bias: np.ndarray | None
    attrs: ConvAttrs
    source: ir.Value | None = None
    start: int = 0
    stop: int = 0
    splitter: ir.Node | None = None


@dataclasses.dataclass
class _Match:
    concat: ir.Node
    branches: list[_Branch]
    source: ir.Value
    window: tuple[int, int]
    channels: int
    mixconv: bool


class FoldSplitConvConcat(ir.passes.InPlacePass):
    """Fold Split/Slice -> N x Conv -> Concat blocks into one Conv with ``group=N``.

    After a call, ``rewrites`` lists the folded blocks and ``skips`` the candidate blocks left
    alone with the reason.

    Args:
        mixconv: Also fold branches whose kernels differ but share centred 'same' padding.
        subgraphs: Also fold inside If/Loop/Scan bodies.
        functions: Also fold inside model-local functions.
    """

    def __init__(self, *, mixconv: bool = True, subgraphs: bool = True, functions: bool = True):
        super().__init__()
        self.mixconv = mixconv
        self.subgraphs = subgraphs
        self.functions = functions
        self.rewrites: list[Rewrite] = []
        self.skips: list[Skip] = []
        self._opset = 1

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = []
        self.skips = []
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        facts = ShapeFacts(model)
        names = NameScope(model)
        in_functions = function_graphs(model)
        for scope, graph, in_function in graph_scopes(model):
            if in_function and not self.functions:
                continue
            if graph is not model.graph and not in_function and not self.subgraphs:
                continue
            for node in [n for n in graph if is_onnx_op(n, "Concat")]:
                if node.graph is not graph:  # removed by an earlier fold
                    continue
                try:
                    match = self._match(node, facts)
                except Refusal as refusal:
                    self.skips.append(Skip(PASS_NAME, scope, node_label(node), str(refusal)))
                    logger.debug("skip %s: %s", node_label(node), refusal)
                    continue
                if match is None:
                    continue
                record = self._rewrite(match, graph, names, id(graph) in in_functions)
                self.rewrites.append(Rewrite(PASS_NAME, scope, node_label(node), **record))
        return ir.passes.PassResult(model, modified=bool(self.rewrites))

    # ----------------------------------------------------------------------------- matching

    def _match(self, concat: ir.Node, facts: ShapeFacts) -> _Match | None:
        """A foldable block anchored at ``concat``; None if it is not a candidate at all."""
        inputs = list(concat.inputs)
        if len(inputs) < 2 or any(v is None for v in inputs):
            return None
        chains = [_branch_chain(v) for v in inputs]
        if sum(chain is not None for chain in chains) < 2:
            return None  # not a split-conv-concat block: say nothing
        for index, chain in enumerate(chains):
            if chain is None:
                raise Refusal(f"Concat input {index} is not produced by a Conv branch")
        op_types = {chain[0].op_type for chain in chains}
        if len(op_types) > 1:
            raise Refusal("branches mix Conv and ConvTranspose")
        for index, value in enumerate(inputs):
            _check_single_use(value, concat, f"branch {index}")
        branches = [self._branch(chain) for chain in chains]
        rank = branches[0].weight.ndim
        if any(b.weight.ndim != rank for b in branches):
            raise Refusal("branches have convolutions of different rank")
        axis = attr_int(concat, "axis", 1)
        if axis < 0:
            axis += rank
        if axis != 1:
            raise Refusal(f"Concat is on axis {axis}, not the channel axis 1")
        for index, branch in enumerate(branches):
            _locate_channels(branch, index, rank, facts)
        source = branches[0].source
        if any(b.source is not source for b in branches):
            raise Refusal("branches take channels of different tensors")
        window = _check_ranges(branches)
        channels = _source_channels(branches, facts)
        mixconv = self._check_conv_attributes(branches)
        _check_same_activation(branches)
        return _Match(concat, branches, source, window, channels, mixconv)

    def _branch(self, chain: tuple[ir.Node, ir.Node | None, ir.Node | None]) -> _Branch:
        conv, batch_norm, activation = chain
        if len(conv.inputs) < 2 or conv.inputs[1] is None:
            raise Refusal(f"{node_label(conv)} has no weight input")
        weight = const_array(conv.inputs[1])
        if weight is None:
            raise Refusal(f"weight of {node_label(conv)} is not a constant")
        bias = None
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            bias = const_array(conv.inputs[2])
            if bias is None:
                raise Refusal(f"bias of {node_label(conv)} is not a constant")
        if weight.ndim < 3:
            raise Refusal(f"{node_label(conv)} has a weight of rank {weight.ndim}")
        attrs = conv_attrs(conv, weight.shape)
        if batch_norm is not None:
            if attr_int(batch_norm, "training_mode", 0) != 0:
                raise Refusal(f"{node_label(batch_norm)} is in training mode")
            if any(const_array(v) is None for v in batch_norm.inputs[1:5]):
                raise Refusal(
                    f"{node_label(batch_norm)}: BatchNormalization parameters are not constant"
                )
        return _Branch(conv, batch_norm, activation, weight, bias, attrs)

    def _check_conv_attributes(self, branches: list[_Branch]) -> bool:
        """Raise if the Convs cannot share one node; return True when MixConv embedding is needed."""
        first = branches[0]
        out_axis, _ = (0, 1) if first.attrs.op_type == "Conv" else (1, 0)
        dtypes = {b.weight.dtype for b in branches}
        if len(dtypes) > 1:
            raise Refusal(f"branch weights have different types {sorted(map(str, dtypes))}")
        outs = [b.weight.shape[out_axis] for b in branches]
        if len(set(outs)) > 1:
            raise Refusal(f"branches have different output channel counts {outs}")
        for field in ("group", "strides", "output_padding", "output_shape"):
            values = [getattr(b.attrs, field) for b in branches]
            if len(set(values)) > 1:
                raise Refusal(f"Conv attribute '{field}' differs between branches: {values}")
        same = {
            (b.attrs.kernel, b.attrs.dilations, b.attrs.pads, b.attrs.auto_pad) for b in branches
        }
        if len(same) == 1:
            return False
        kernels = {(b.attrs.kernel, b.attrs.dilations) for b in branches}
        if len(kernels) == 1:
            raise Refusal(
                "Conv padding differs between branches: "
                f"{[(b.attrs.auto_pad, list(b.attrs.pads)) for b in branches]}"
            )
        if first.attrs.op_type != "Conv":
            raise Refusal("ConvTranspose kernels differ between branches")
        if not self.mixconv:
            raise Refusal("Conv kernels differ between branches (MixConv folding is off)")
        for branch in branches:
            if not _is_centred_same(branch.attrs):
                raise Refusal(
                    "Conv kernels differ and "
                    f"{node_label(branch.conv)} is not centred 'same' padding, so the "
                    "kernels cannot share one grid"
                )
        return True

    # ----------------------------------------------------------------------------- rewriting

    def _rewrite(self, match: _Match, graph: ir.Graph, names: NameScope, in_function: bool) -> dict:
        concat = match.concat
        branches = match.branches
        first = branches[0]
        op_type = first.attrs.op_type
        n = len(branches)
        notes: list[str] = []

        weights, biases = [], []
        for branch in branches:
            weight, bias = _weights_with_batch_norm(branch)
            weights.append(weight)
            biases.append(bias)
            if branch.batch_norm is not None and "BatchNormalization folded" not in notes:
                notes.append("BatchNormalization folded")
        attributes = {key: attr for key, attr in first.conv.attributes.items() if key != "group"}
        if match.mixconv:
            weights, grid = _embed_kernels(branches, weights)
            attributes.pop("auto_pad", None)
            attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", grid.kernel)
            attributes["dilations"] = ir.AttrInt64s("dilations", grid.dilations)
            attributes["pads"] = ir.AttrInt64s("pads", grid.pads)
            notes.append(
                "MixConv: kernels embedded in one "
                f"{'x'.join(map(str, grid.kernel))} grid (dilation {list(grid.dilations)})"
            )
        group = n * first.attrs.group
        attributes["group"] = ir.AttrInt64("group", group)
        weight = np.concatenate(weights, axis=0)
        bias = None
        if any(b is not None for b in biases):
            channels_out = (
                weights[0].shape[0]
                if op_type == "Conv"
                else weights[0].shape[1] * first.attrs.group
            )
            bias = np.concatenate(
                [b if b is not None else np.zeros(channels_out, weight.dtype) for b in biases]
            ).astype(weight.dtype)

        base = names.fresh(f"{first.conv.name or 'conv'}_grouped")
        weight_value = add_constant(
            graph, weight, names.fresh(f"{base}.weight"), as_node=in_function, before=concat
        )
        conv_inputs = [match.source, weight_value]
        if bias is not None:
            conv_inputs.append(
                add_constant(
                    graph, bias, names.fresh(f"{base}.bias"), as_node=in_function, before=concat
                )
            )
        lo, hi = match.window
        if (lo, hi) != (0, match.channels):
            conv_inputs[0] = self._insert_window_slice(match, graph, names, in_function, base)
            notes.append(
                f"gapped split: keeps channels [{lo}:{hi}) of {match.channels} by one Slice"
            )
        new_conv = ir.node(op_type, conv_inputs, attributes=attributes, name=base, num_outputs=1)
        new_nodes = [new_conv]
        result = new_conv.outputs[0]
        activation = first.activation
        if activation is not None:
            result.name = names.fresh(f"{base}_out")
            result.type = concat.outputs[0].type
            result.shape = concat.outputs[0].shape
            act_inputs = [result, *activation.inputs[1:]]
            new_act = ir.node(
                activation.op_type,
                act_inputs,
                attributes=dict(activation.attributes),
                name=names.fresh(f"{base}_{activation.op_type.lower()}"),
                domain=activation.domain,
                version=activation.version,
                num_outputs=1,
            )
            new_nodes.append(new_act)
            result = new_act.outputs[0]
            notes.append(f"{activation.op_type} moved after the grouped {op_type}")
        graph.insert_before(concat, new_nodes)

        # The result takes over the Concat output's name, so value_info and graph outputs hold.
        take_over_value(concat.outputs[0], result, names, "folded")
        doomed = [concat]
        for branch in branches:
            doomed.extend(
                n for n in (branch.activation, branch.batch_norm, branch.conv) if n is not None
            )
        remove_with_dead_producers(graph, doomed)

        splitters = sorted({b.splitter.op_type for b in branches if b.splitter is not None})
        summary = (
            f"{n} x {op_type} -> one {op_type}(group={group}), weight {list(weight.shape)}"
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
                "weight_shape": list(weight.shape),
                "split_by": splitters,
                "branch_convs": [node_label(b.conv) for b in branches],
                "new_node": new_conv.name,
                "notes": notes,
            },
        }

    def _insert_window_slice(
        self, match: _Match, graph: ir.Graph, names: NameScope, in_function: bool, base: str
    ) -> ir.Value:
        lo, hi = match.window
        name = names.fresh(f"{base}_window")
        if self._opset < 10:  # Slice-1 takes its bounds as attributes
            attributes = {"starts": [lo], "ends": [hi], "axes": [1]}
            node = ir.node("Slice", [match.source], attributes=attributes, name=name)
        else:
            bounds = (("starts", lo), ("ends", hi), ("axes", 1), ("steps", 1))
            consts = [
                add_constant(
                    graph,
                    np.array([v], np.int64),
                    names.fresh(f"{base}.window_{label}"),
                    as_node=in_function,
                    before=match.concat,
                )  # fmt: skip
                for label, v in bounds
            ]
            node = ir.node("Slice", [match.source, *consts], name=name)
        node.outputs[0].name = names.fresh(f"{base}_window_out")
        graph.insert_before(match.concat, node)
        return node.outputs[0]


# --------------------------------------------------------------------------------- helpers


def _branch_chain(value: ir.Value) -> tuple[ir.Node, ir.Node | None, ir.Node | None] | None:
    """(conv, batch_norm, activation) ending in ``value``, or None if no Conv roots it."""
    node = value.producer()
    activation = batch_norm = None
    if (
        node is not None
        and node.domain in ("", "ai.onnx")
        and node.op_type in ELEMENTWISE_ACTIVATIONS
    ):
        activation = node
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if is_onnx_op(node, "BatchNormalization"):
        batch_norm = node
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if not is_onnx_op(node, *CONV_OPS):
        return None
    return node, batch_norm, activation


def _check_single_use(value: ir.Value, concat: ir.Node, label: str) -> None:
    """Every value from the Conv to the Concat must feed only the next node of the branch."""
    current = value
    consumer = concat
    while True:
        if current.is_graph_output():
            raise Refusal(f"{label}: '{current.name}' is also a graph output")
        uses = list(current.uses())
        if len(uses) != 1 or uses[0].node is not consumer:
            others = sorted({node_label(u.node) for u in uses if u.node is not consumer})
            detail = f"also used by {others}" if others else "used more than once by the Concat"
            raise Refusal(f"{label}: '{current.name}' is {detail}")
        producer = current.producer()
        if producer is None or is_onnx_op(producer, *CONV_OPS):
            return
        for extra in producer.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                raise Refusal(f"{label}: {node_label(producer)} has other outputs in use")
        consumer = producer
        current = producer.inputs[0]


def _locate_channels(branch: _Branch, index: int, rank: int, facts: ShapeFacts) -> None:
    """Set branch.source/start/stop from the Split or Slice feeding the Conv."""
    conv_input = branch.conv.inputs[0]
    node = conv_input.producer() if conv_input is not None else None
    if is_onnx_op(node, "Split"):
        _from_split(branch, node, conv_input, rank, facts)
    elif is_onnx_op(node, "Slice"):
        _from_slice(branch, node, rank, facts)
    else:
        what = node.op_type if node is not None else "a graph input"
        raise Refusal(f"branch {index}: Conv input comes from {what}, not a channel Split or Slice")
    width = branch.stop - branch.start
    expected = (
        branch.weight.shape[1] * branch.attrs.group
        if branch.attrs.op_type == "Conv"
        else branch.weight.shape[0]
    )
    if width <= 0:
        raise Refusal(f"branch {index}: zero-size split part")
    if width != expected:
        raise Refusal(f"branch {index}: takes {width} channels but its weight expects {expected}")


def _normalise_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _from_split(
    branch: _Branch, split: ir.Node, output: ir.Value, rank: int, facts: ShapeFacts
) -> None:
    axis = _normalise_axis(attr_int(split, "axis", 0), rank)
    if axis != 1:
        raise Refusal(f"{node_label(split)} splits axis {axis}, not the channel axis 1")
    source = split.inputs[0]
    n = len(split.outputs)
    sizes = int_list(split, "split")
    if sizes is None and len(split.inputs) > 1 and split.inputs[1] is not None:
        array = facts.int_values(split.inputs[1])
        if array is None:
            raise Refusal(f"{node_label(split)}: split sizes are not constant")
        sizes = [int(v) for v in array.reshape(-1)]
    if sizes is None:
        channels = facts.static_dim(source, 1)
        if channels is None:
            raise Refusal(
                f"channel dimension of '{source.name}' is symbolic; cannot prove the split sizes"
            )
        num_outputs = split.attributes.get("num_outputs")
        if num_outputs is not None:
            chunk = -(-channels // num_outputs.as_int())
            sizes = [min(chunk, max(channels - i * chunk, 0)) for i in range(n)]
        else:
            if channels % n:
                raise Refusal(
                    f"{node_label(split)}: {channels} channels do not split evenly in {n}"
                )
            sizes = [channels // n] * n
    if len(sizes) != n:
        raise Refusal(f"{node_label(split)}: {len(sizes)} split sizes for {n} outputs")
    # Only the parts that feed branches must be equal (checked with the ranges): parts no
    # branch reads just narrow the window the grouped Conv sees.
    index = list(split.outputs).index(output)
    branch.source = source
    branch.start = sum(sizes[:index])
    branch.stop = branch.start + sizes[index]
    branch.splitter = split


def _from_slice(branch: _Branch, node: ir.Node, rank: int, facts: ShapeFacts) -> None:
    if "starts" in node.attributes:  # opset < 10
        starts = int_list(node, "starts")
        ends = int_list(node, "ends")
        axes = int_list(node, "axes", range(len(starts)))
        steps = [1] * len(starts)
    else:
        operands = [facts.int_values(v) if v is not None else None for v in node.inputs[1:5]]
        operands += [None] * (4 - len(operands))
        if operands[0] is None or operands[1] is None:
            if facts.static_dim(node.inputs[0], 1) is None:
                raise Refusal(
                    f"channel dimension of '{node.inputs[0].name}' is symbolic; "
                    "cannot prove the slice ranges"
                )
            raise Refusal(f"{node_label(node)}: Slice bounds are not constant")
        starts = [int(v) for v in operands[0]]
        ends = [int(v) for v in operands[1]]
        given_axes = len(node.inputs) > 3 and node.inputs[3] is not None
        given_steps = len(node.inputs) > 4 and node.inputs[4] is not None
        if (given_axes and operands[2] is None) or (given_steps and operands[3] is None):
            raise Refusal(f"{node_label(node)}: Slice axes or steps are not constant")
        axes = [int(v) for v in operands[2]] if given_axes else list(range(len(starts)))
        steps = [int(v) for v in operands[3]] if given_steps else [1] * len(starts)
    axes = [_normalise_axis(a, rank) for a in axes]
    if axes != [1]:
        raise Refusal(f"{node_label(node)} slices axes {axes}, not only the channel axis 1")
    if steps != [1]:
        raise Refusal(f"{node_label(node)}: strided slice (step {steps[0]})")
    source = node.inputs[0]
    channels = facts.static_dim(source, 1)
    if channels is None:
        raise Refusal(
            f"channel dimension of '{source.name}' is symbolic; cannot prove the slice ranges"
        )
    start, end = starts[0], ends[0]
    start = start + channels if start < 0 else start
    end = end + channels if end < 0 else end
    branch.source = source
    branch.start = min(max(start, 0), channels)
    branch.stop = min(max(end, 0), channels)
    branch.splitter = node


def _check_ranges(branches: list[_Branch]) -> tuple[int, int]:
    """Channel ranges must be equal, adjacent and in Concat order; return the covered window."""
    ranges = [(b.start, b.stop) for b in branches]
    ordered = sorted(ranges)
    for (_, hi0), (lo1, _) in zip(ordered, ordered[1:]):
        if lo1 < hi0:
            raise Refusal(f"overlapping slices {ordered}")
        if lo1 > hi0:
            raise Refusal(
                f"channels [{hi0}:{lo1}) between slices are skipped (gap inside the split)"
            )
    if ranges != ordered:
        raise Refusal(f"Concat order {ranges} differs from the channel order of the split")
    widths = {hi - lo for lo, hi in ranges}
    if len(widths) > 1:
        raise Refusal(f"uneven split sizes {[hi - lo for lo, hi in ranges]}")
    return ranges[0][0], ranges[-1][1]


def _source_channels(branches: list[_Branch], facts: ShapeFacts) -> int:
    """Channels of the split tensor: static dim if known, else the sum of explicit Split sizes."""
    splitter = branches[0].splitter
    same_split = all(b.splitter is splitter for b in branches) and is_onnx_op(splitter, "Split")
    if same_split and len(branches) == len(splitter.outputs):
        return branches[-1].stop  # the Split's sizes sum to the channel dim at run time
    static = facts.static_dim(branches[0].source, 1)
    if static is not None:
        return static
    raise Refusal(
        f"channel dimension of '{branches[0].source.name}' is symbolic; cannot prove that the "
        "branches cover it"
    )


def _check_same_activation(branches: list[_Branch]) -> None:
    signatures = []
    for branch in branches:
        act = branch.activation
        if act is None:
            signatures.append(None)
            continue
        attrs = tuple(sorted((k, repr(a.value)) for k, a in act.attributes.items()))
        extras = []
        for value in act.inputs[1:]:
            if value is None:
                extras.append(None)
                continue
            array = const_array(value)
            if array is None:
                raise Refusal(
                    f"{node_label(act)}: activation parameter '{value.name}' is not constant"
                )
            extras.append((array.dtype.str, array.tobytes()))
        signatures.append((act.op_type, act.domain, attrs, tuple(extras)))
    if len(set(signatures)) > 1:
        kinds = [s[0] if s else "none" for s in signatures]
        raise Refusal(f"branches end in different activations {kinds}")


def _weights_with_batch_norm(branch: _Branch) -> tuple[np.ndarray, np.ndarray | None]:
    """The branch's weight and bias with its BatchNormalization folded in (float64 math)."""
    weight, bias = branch.weight, branch.bias
    bn = branch.batch_norm
    if bn is None:
        return weight, bias
    params = [const_array(v) for v in bn.inputs[1:5]]  # proven constant by _branch
    scale, offset, mean, var = (p.astype(np.float64) for p in params)
    factor = scale / np.sqrt(var + attr_float(bn, "epsilon", 1e-5))
    w64 = weight.astype(np.float64)
    if branch.attrs.op_type == "Conv":
        w64 = w64 * factor.reshape((-1,) + (1,) * (w64.ndim - 1))
    else:  # ConvTranspose: [C_in, C_out/g, k...]; output channel = group * C_out/g + j
        g = branch.attrs.group
        per_group = w64.shape[1]
        cin_per_group = w64.shape[0] // g
        groups_of_rows = np.repeat(np.arange(g), cin_per_group)
        index = groups_of_rows[:, None] * per_group + np.arange(per_group)[None, :]
        w64 = w64 * factor[index].reshape(index.shape + (1,) * (w64.ndim - 2))
    b64 = bias.astype(np.float64) if bias is not None else np.zeros_like(mean)
    b64 = (b64 - mean) * factor + offset
    return w64.astype(weight.dtype), b64.astype(weight.dtype)


def _is_centred_same(attrs: ConvAttrs) -> bool:
    effective = attrs.effective_kernel
    if any(e % 2 == 0 for e in effective):
        return False
    if attrs.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return all(s == 1 for s in attrs.strides)
    rank = attrs.spatial_rank
    return all(
        attrs.pads[a] == attrs.pads[a + rank] == (effective[a] - 1) // 2 for a in range(rank)
    )


@dataclasses.dataclass
class _Grid:
    kernel: list[int]
    dilations: list[int]
    pads: list[int]


def _embed_kernels(
    branches: list[_Branch], weights: list[np.ndarray]
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
