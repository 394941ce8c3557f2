"""Matching for the fold pass: which Concat inputs form a Split/Slice -> N Conv block.

``match_concat`` reads a Concat and its producers and returns a :class:`FoldMatch` (nothing is
modified) or raises :class:`~._common.Refusal` with the reason the block cannot fold. The
rewrite itself is in :mod:`.fold_split_conv_concat`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ._activations import (
    activation_input,
    check_same_activation,
    silu_parts,
)
from ._common import (
    CONV_OPS,
    NODE,
    ConvAttrs,
    Refusal,
    attr_int,
    const_array,
    conv_attrs,
    int_list,
    is_onnx_op,
    node_label,
)
from ._driver import Match
from ._fold_quant import (
    PER_AXIS_OPSET,
    Params,
    check_pairs,
    check_qlinear,
    data_input,
    input_nodes,
    output_pair,
)
from ._geometry import ConvGeometry
from ._quant import QuantConst, join, read_conv_parameters
from ._shapes import ShapeFacts

# (conv, batch_norm, activation, [output Q, output DQ])
Chain = tuple[ir.Node, "ir.Node | None", "ir.Node | None", "list[ir.Node]"]
# Convolutions a branch can hold: QLinearConv folds back what the expand pass made of one.
BRANCH_CONV_OPS = (*CONV_OPS, "QLinearConv")


@dataclasses.dataclass
class Branch:
    """One Conv [-> BatchNormalization] [-> activation] path into the Concat."""

    conv: ir.Node
    batch_norm: ir.Node | None
    activation: ir.Node | None
    weight: np.ndarray
    bias: np.ndarray | None
    attrs: ConvAttrs
    geometry: ConvGeometry
    source: ir.Value | None = None
    start: int = 0
    stop: int = 0
    splitter: ir.Node | None = None
    weight_q: QuantConst | None = None
    """A quantized weight (DequantizeLinear of constants, or QLinearConv's); ``weight`` is
    then its integers."""
    bias_q: QuantConst | None = None
    output_qdq: list[ir.Node] = dataclasses.field(default_factory=list)
    """The Q, DQ pair after the branch's activation (empty: none)."""


@dataclasses.dataclass
class Block:
    """One foldable run: Concat inputs ``run`` all come from ``branches`` of one split tensor."""

    run: range
    """Positions of the block's branches among the Concat's inputs."""
    branches: list[Branch]
    source: ir.Value
    window: tuple[int, int]
    """Channels [lo, hi) of ``source`` the branches cover."""
    channels: int
    """Channels of ``source``."""
    mixconv: bool
    """The kernels differ and are embedded in one grid."""
    input_params: list[list[Params]] = dataclasses.field(default_factory=list)
    """The branches' input [Q] DQ: one column per node, with every branch's scale and zero
    point (empty: no input quantization)."""
    output_params: list[list[Params]] = dataclasses.field(default_factory=list)
    """The same for the Q, DQ after each branch."""
    shared: list[int] = dataclasses.field(default_factory=list)
    """Branches (indices) whose output is also used elsewhere: served by a Slice."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What the cost decision found, for the report."""


@dataclasses.dataclass
class FoldMatch(Match):
    """The foldable blocks of one Concat, in input order.

    Either one block that is every input of the Concat, or runs of consecutive inputs of a
    wider Concat (TorchScript merges nested ``torch.cat``s), each folded in its place.
    """

    blocks: list[Block]

    @property
    def concat(self) -> ir.Node:
        return self.anchor

    @property
    def whole(self) -> bool:
        """The one block is the whole Concat (the Concat goes away)."""
        return len(self.blocks) == 1 and len(self.blocks[0].run) == len(self.anchor.inputs)


def match_concat(
    concat: ir.Node, facts: ShapeFacts, *, mixconv: bool, opset: int = 21
) -> FoldMatch | None:
    """The foldable blocks anchored at ``concat``; None if it is not a candidate at all.

    Raises:
        Refusal: no block can fold; the reason of the first candidate.
    """
    inputs = list(concat.inputs)
    if len(inputs) < 2 or any(v is None for v in inputs):
        return None
    chains = [branch_chain(v) for v in inputs]
    if sum(chain is not None for chain in chains) < 2:
        return None  # not a split-conv-concat block: say nothing
    runs = _runs(chains)
    everything = range(len(inputs))
    if not runs or runs == [everything]:
        for index, chain in enumerate(chains):
            if chain is None:
                raise Refusal(f"Concat input {index} is not produced by a Conv branch", concat)
        block = _match_block(concat, everything, chains, facts, mixconv, opset)
        return FoldMatch(concat, [block])
    blocks, refusals = [], []
    for run in runs:
        try:
            blocks.append(_match_block(concat, run, chains, facts, mixconv, opset))
        except Refusal as refusal:
            refusals.append(refusal)
    if not blocks:
        raise refusals[0]
    return FoldMatch(concat, blocks, refusals=refusals)


def _runs(chains: list[Chain | None]) -> list[range]:
    """Maximal runs of at least two consecutive branches that split the same tensor."""
    runs: list[range] = []
    start, key = 0, None
    for index, chain in enumerate([*chains, None]):
        here = _split_tensor(chain)
        if here is None or here is not key:
            if key is not None and index - start >= 2:
                runs.append(range(start, index))
            start, key = index, here
    return runs


def _split_tensor(chain: Chain | None) -> ir.Value | None:
    """The tensor a branch's Conv takes channels of by a Split or Slice, if it does."""
    value = data_input(chain[0]) if chain is not None else None
    if value is None:
        return None
    node = value.producer()
    if not is_onnx_op(node, "Split", "Slice") or not node.inputs:
        return None
    return node.inputs[0]


def _match_block(
    concat: ir.Node,
    run: range,
    chains: list[Chain | None],
    facts: ShapeFacts,
    mixconv: bool,
    opset: int,
) -> Block:
    """The block made of Concat inputs ``run``, or Refusal."""
    run_chains = [chains[index] for index in run]
    if len({chain[0].op_type for chain in run_chains}) > 1:
        raise Refusal("branches mix Conv and ConvTranspose", concat)
    shared = [
        position
        for position, index in enumerate(run)
        if _check_single_use(concat.inputs[index], concat, f"branch {index}")
    ]
    branches = [_branch(chain) for chain in run_chains]
    rank = branches[0].weight.ndim
    if any(b.weight.ndim != rank for b in branches):
        raise Refusal("branches have convolutions of different rank", concat)
    axis = attr_int(concat, "axis", 1)
    if axis < 0:
        axis += rank
    if axis != 1:
        raise Refusal(f"Concat is on axis {axis}, not the channel axis 1", concat)
    for index, branch in zip(run, branches):
        _locate_channels(branch, index, rank, facts)
    source = branches[0].source
    if any(b.source is not source for b in branches):
        raise Refusal("branches take channels of different tensors", concat)
    window = _check_ranges(branches)
    channels = _source_channels(branches, facts)
    embed = _check_conv_attributes(branches, mixconv)
    check_same_activation([b.activation for b in branches])
    block = Block(run, branches, source, window, channels, embed, shared=shared)
    _check_quantization(block, rank, opset)
    return block


def _check_quantization(block: Block, rank: int, opset: int) -> None:
    """Raise unless the branches' quantization can be one grouped conv's (see _fold_quant)."""
    branches = block.branches
    if len({b.weight_q is None for b in branches}) > 1:
        raise Refusal("some branch weights are quantized and others are not")
    if len({b.conv.op_type for b in branches}) > 1:
        raise Refusal(f"branches mix {sorted({b.conv.op_type for b in branches})}")
    if branches[0].weight_q is not None:
        if block.mixconv and branches[0].weight_q.block_size:
            raise Refusal("MixConv of blocked-quantized weights: embedding would cut the blocks")
        weights = [b.weight_q for b in branches]
        if block.mixconv:  # kernels differ: only the rows matter to the scales
            weights = [dataclasses.replace(w, values=w.values[(slice(None), slice(None))
                                                              + (0,) * (w.values.ndim - 2)])
                       for w in weights]  # fmt: skip
        _check_joined(weights, "weights", opset)
    if branches[0].conv.op_type == "QLinearConv":
        check_qlinear([b.conv for b in branches])
        return
    if len({b.bias_q is None for b in branches}) > 1 or (
        branches[0].bias_q is not None and any(b.bias is None for b in branches)
    ):
        raise Refusal("some branch biases are quantized and others are not")
    if branches[0].bias_q is not None:
        _check_joined([b.bias_q for b in branches], "biases", opset)
    block.input_params = check_pairs([input_nodes(b.conv) for b in branches], rank, opset, "inputs")
    block.output_params = check_pairs([b.output_qdq for b in branches], rank, opset, "outputs")


def _check_joined(parts: list[QuantConst], what: str, opset: int) -> None:
    """Raise if one tensor cannot hold the parts' quantization (see :func:`._quant.join`)."""
    joined = join(parts, f"branch {what}")
    if joined.axis is not None and opset < PER_AXIS_OPSET:
        raise Refusal(
            f"branches quantize their {what} with different scales, and per-channel "
            f"quantization needs opset {PER_AXIS_OPSET} (model: {opset})"
        )


def branch_chain(value: ir.Value) -> Chain | None:
    """(conv, batch_norm, activation, [Q, DQ]) ending in ``value``, or None if no Conv roots it."""
    pair = output_pair(value)
    if pair is not None:
        value = pair[0].inputs[0]
    node = value.producer()
    activation = batch_norm = None
    moved = activation_input(node)
    if moved is not None:
        activation = node
        node = moved.producer()
    if is_onnx_op(node, "BatchNormalization"):
        batch_norm = node
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if not is_onnx_op(node, *BRANCH_CONV_OPS):
        return None
    if node.op_type == "QLinearConv" and (batch_norm or activation or pair):
        return None  # a QLinearConv's output is integers: nothing float follows it here
    return node, batch_norm, activation, list(pair or [])


def _branch(chain: Chain) -> Branch:
    conv, batch_norm, activation, output_qdq = chain
    weight, bias, weight_q, bias_q = read_conv_parameters(conv, (0, 3, 4, 5, 6, 7))
    if weight.ndim < 3:
        raise Refusal(f"{NODE} has a weight of rank {weight.ndim}", conv)
    attrs = conv_attrs(conv, weight.shape)
    if batch_norm is not None:
        if weight_q is not None:
            raise Refusal(
                f"{NODE} follows a quantized Conv; its scale cannot fold into integer weights",
                batch_norm,
            )
        if attr_int(batch_norm, "training_mode", 0) != 0:
            raise Refusal(f"{NODE} is in training mode", batch_norm)
        if any(const_array(v) is None for v in batch_norm.inputs[1:5]):
            raise Refusal(f"{NODE}: BatchNormalization parameters are not constant", batch_norm)
    geometry = ConvGeometry.from_weight(conv.op_type, weight.shape, attrs.group)
    return Branch(conv, batch_norm, activation, weight, bias, attrs, geometry,
                  weight_q=weight_q, bias_q=bias_q, output_qdq=output_qdq)  # fmt: skip


def _check_single_use(value: ir.Value, concat: ir.Node, label: str) -> bool:
    """Every value from the Conv to the Concat must feed only the next node of the branch,
    except the branch's output itself: return True when it is also used elsewhere (or is a
    graph output), which the fold serves from a Slice of the grouped output."""
    current = value
    consumers: tuple[ir.Node, ...] = (concat,)  # SiLU's input feeds its Mul and its Sigmoid
    shared = False
    while True:
        uses = list(current.uses())
        others = sorted({node_label(u.node) for u in uses if u.node not in consumers})
        mine = sorted(id(u.node) for u in uses if u.node in consumers)
        if current is value and len(mine) == 1:
            shared = bool(others) or current.is_graph_output()
        else:
            if current.is_graph_output():
                raise Refusal(f"{label}: '{current.name}' is also a graph output",
                              current.producer())  # fmt: skip
            if others or mine != sorted(id(c) for c in consumers):
                detail = f"also used by {others}" if others else "used more than once by the Concat"
                raise Refusal(f"{label}: '{current.name}' is {detail}", current.producer())
        producer = current.producer()
        if producer is None or is_onnx_op(producer, *BRANCH_CONV_OPS):
            return shared
        for extra in producer.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                raise Refusal(f"{label}: {NODE} has other outputs in use", producer)
        silu = silu_parts(producer)
        if silu is not None:
            gate = silu[1].outputs[0]  # the Sigmoid's output feeds only this Mul
            if gate.is_graph_output() or [u.node for u in gate.uses()] != [producer]:
                raise Refusal(f"{label}: '{gate.name}' is also used elsewhere", silu[1])
            consumers, current = (producer, silu[1]), silu[0]
        else:
            consumers, current = (producer,), producer.inputs[0]


def _locate_channels(branch: Branch, index: int, rank: int, facts: ShapeFacts) -> None:
    """Set branch.source/start/stop from the Split or Slice feeding the Conv."""
    conv_input = data_input(branch.conv)
    node = conv_input.producer() if conv_input is not None else None
    if is_onnx_op(node, "Split"):
        _from_split(branch, node, conv_input, rank, facts)
    elif is_onnx_op(node, "Slice"):
        _from_slice(branch, node, rank, facts)
    else:
        what = node.op_type if node is not None else "a graph input"
        raise Refusal(
            f"branch {index}: Conv input comes from {what}, not a channel Split or Slice",
            branch.conv,
        )
    width = branch.stop - branch.start
    expected = branch.geometry.in_channels
    if width <= 0:
        raise Refusal(f"branch {index}: zero-size split part", branch.splitter)
    if width != expected:
        raise Refusal(
            f"branch {index}: takes {width} channels but its weight expects {expected}",
            branch.conv,
        )


def _normalise_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _split_sizes(split: ir.Node, facts: ShapeFacts) -> list[int]:
    """The sizes of a Split's parts, from its attribute, its input or its input's shape."""
    source = split.inputs[0]
    n = len(split.outputs)
    sizes = int_list(split, "split")
    if sizes is None and len(split.inputs) > 1 and split.inputs[1] is not None:
        array = facts.int_values(split.inputs[1])
        if array is None:
            raise Refusal(f"{NODE}: split sizes are not constant", split)
        sizes = [int(v) for v in array.reshape(-1)]
    if sizes is None:
        channels = facts.static_dim(source, 1)
        if channels is None:
            raise Refusal(
                f"channel dimension of '{source.name}' is symbolic; cannot prove the split sizes",
                split,
            )
        num_outputs = split.attributes.get("num_outputs")
        if num_outputs is not None:
            chunk = -(-channels // num_outputs.as_int())
            sizes = [min(chunk, max(channels - i * chunk, 0)) for i in range(n)]
        else:
            if channels % n:
                raise Refusal(f"{NODE}: {channels} channels do not split evenly in {n}", split)
            sizes = [channels // n] * n
    if len(sizes) != n:
        raise Refusal(f"{NODE}: {len(sizes)} split sizes for {n} outputs", split)
    return sizes


def _from_split(
    branch: Branch, split: ir.Node, output: ir.Value, rank: int, facts: ShapeFacts
) -> None:
    axis = _normalise_axis(attr_int(split, "axis", 0), rank)
    if axis != 1:
        raise Refusal(f"{NODE} splits axis {axis}, not the channel axis 1", split)
    sizes = _split_sizes(split, facts)
    # Only the parts that feed branches must be equal (checked with the ranges): parts no
    # branch reads just narrow the window the grouped Conv sees.
    index = list(split.outputs).index(output)
    branch.source = split.inputs[0]
    branch.start = sum(sizes[:index])
    branch.stop = branch.start + sizes[index]
    branch.splitter = split


def _slice_operands(node: ir.Node, facts: ShapeFacts) -> tuple[list[int], ...]:
    """(starts, ends, axes, steps) of a Slice, from attributes (opset < 10) or inputs."""
    if "starts" in node.attributes:  # opset < 10
        starts = int_list(node, "starts")
        ends = int_list(node, "ends")
        axes = int_list(node, "axes", range(len(starts)))
        return starts, ends, axes, [1] * len(starts)
    operands = [facts.int_values(v) if v is not None else None for v in node.inputs[1:5]]
    operands += [None] * (4 - len(operands))
    if operands[0] is None or operands[1] is None:
        if facts.static_dim(node.inputs[0], 1) is None:
            raise Refusal(
                f"channel dimension of '{node.inputs[0].name}' is symbolic; "
                "cannot prove the slice ranges",
                node,
            )
        raise Refusal(f"{NODE}: Slice bounds are not constant", node)
    starts = [int(v) for v in operands[0]]
    ends = [int(v) for v in operands[1]]
    given_axes = len(node.inputs) > 3 and node.inputs[3] is not None
    given_steps = len(node.inputs) > 4 and node.inputs[4] is not None
    if (given_axes and operands[2] is None) or (given_steps and operands[3] is None):
        raise Refusal(f"{NODE}: Slice axes or steps are not constant", node)
    axes = [int(v) for v in operands[2]] if given_axes else list(range(len(starts)))
    steps = [int(v) for v in operands[3]] if given_steps else [1] * len(starts)
    return starts, ends, axes, steps


def _from_slice(branch: Branch, node: ir.Node, rank: int, facts: ShapeFacts) -> None:
    starts, ends, axes, steps = _slice_operands(node, facts)
    axes = [_normalise_axis(a, rank) for a in axes]
    if axes != [1]:
        raise Refusal(f"{NODE} slices axes {axes}, not only the channel axis 1", node)
    if steps != [1]:
        raise Refusal(f"{NODE}: strided slice (step {steps[0]})", node)
    source = node.inputs[0]
    channels = facts.static_dim(source, 1)
    if channels is None:
        raise Refusal(
            f"channel dimension of '{source.name}' is symbolic; cannot prove the slice ranges",
            node,
        )
    start, end = starts[0], ends[0]
    start = start + channels if start < 0 else start
    end = end + channels if end < 0 else end
    branch.source = source
    branch.start = min(max(start, 0), channels)
    branch.stop = min(max(end, 0), channels)
    branch.splitter = node


def _check_ranges(branches: list[Branch]) -> tuple[int, int]:
    """Channel ranges must be equal, adjacent and in Concat order; return the covered window."""
    splitter = branches[0].splitter
    ranges = [(b.start, b.stop) for b in branches]
    ordered = sorted(ranges)
    for (_, hi0), (lo1, _) in zip(ordered, ordered[1:]):
        if lo1 < hi0:
            raise Refusal(f"overlapping slices {ordered}", splitter)
        if lo1 > hi0:
            raise Refusal(
                f"channels [{hi0}:{lo1}) between slices are skipped (gap inside the split)",
                splitter,
            )
    if ranges != ordered:
        raise Refusal(f"Concat order {ranges} differs from the channel order of the split")
    widths = {hi - lo for lo, hi in ranges}
    if len(widths) > 1:
        raise Refusal(f"uneven split sizes {[hi - lo for lo, hi in ranges]}", splitter)
    return ranges[0][0], ranges[-1][1]


def _source_channels(branches: list[Branch], facts: ShapeFacts) -> int:
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
        "branches cover it",
        splitter,
    )


def _check_conv_attributes(branches: list[Branch], mixconv: bool) -> bool:
    """Raise if the Convs cannot share one node; return True when MixConv embedding is needed."""
    first = branches[0]
    dtypes = {b.weight.dtype for b in branches}
    if len(dtypes) > 1:
        raise Refusal(f"branch weights have different types {sorted(map(str, dtypes))}")
    # What the weights hold per row: C_out for Conv, C_out/group for ConvTranspose (so a group
    # drift between ConvTransposes is reported here, in the words users have seen so far).
    outs = [b.geometry.out_per_group if b.geometry.transpose else b.geometry.out_channels
            for b in branches]  # fmt: skip
    if len(set(outs)) > 1:
        raise Refusal(f"branches have different output channel counts {outs}")
    for field in ("group", "strides", "output_padding", "output_shape"):
        values = [getattr(b.attrs, field) for b in branches]
        if len(set(values)) > 1:
            raise Refusal(f"Conv attribute '{field}' differs between branches: {values}")
    same = {(b.attrs.kernel, b.attrs.dilations, b.attrs.pads, b.attrs.auto_pad) for b in branches}
    if len(same) == 1:
        return False
    kernels = {(b.attrs.kernel, b.attrs.dilations) for b in branches}
    if len(kernels) == 1:
        raise Refusal(
            "Conv padding differs between branches: "
            f"{[(b.attrs.auto_pad, list(b.attrs.pads)) for b in branches]}"
        )
    if first.attrs.op_type != "Conv":
        raise Refusal(f"{first.attrs.op_type} kernels differ between branches")
    if not mixconv:
        raise Refusal("Conv kernels differ between branches (MixConv folding is off)")
    for branch in branches:
        if not _is_centred_same(branch.attrs):
            raise Refusal(
                f"Conv kernels differ and {NODE} is not centred 'same' padding, so the "
                "kernels cannot share one grid",
                branch.conv,
            )
    return True


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
