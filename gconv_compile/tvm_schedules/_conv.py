"""Find the 2-D convolution in a legalised, fused PrimFunc and describe it.

Relax's ``LegalizeOps`` lowers ``relax.nn.conv2d`` (any ``groups``) through ``topi.nn.conv`` into
one reduction block::

    for n, f, y, x, rc, ry, rx:            # S S S S R R R
        out[n, f, y, x] += inp[n, f // Kg * Cg + rc, y * sh + ry * dh, x * sw + rx * dw]
                           * weight[f, rc, ry, rx]

where ``inp`` is either a function parameter or a ``pad_temp`` block computed in the same
function. ``FuseOps``/``FuseTIR`` add elementwise epilogue blocks after it (bias add, folded batch
norm, activation, residual add). ``find_conv`` recognises this shape from the block's iteration
types and access indices (not from block names, which change between TVM versions) and returns a
``ConvInfo``, or a reason string when the function is not a conv the schedules handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvm import s_tir, tirx
from tvm import sym as arith

_SPATIAL = 0  # tirx.IterVar.DataPar
_REDUCE = 2  # tirx.IterVar.CommReduce


@dataclass
class ConvInfo:
    """A recognised NCHW/OIHW 2-D convolution block and its neighbours in the PrimFunc."""

    block: s_tir.schedule.SBlockRV
    batch: object  # int, or a tirx.Var for a symbolic batch
    in_channels: int
    out_channels: int
    in_per_group: int
    out_h: int
    out_w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    dtype: str
    input_is_padded: bool  # the conv reads a pad block computed in the same function
    pad_block: s_tir.schedule.SBlockRV | None
    weight_param: str  # name of the weight parameter (a function parameter)
    weight_is_param: bool
    pad_is_identity: bool = False  # the 'pad' block copies without padding (pads all zero)
    epilogue: list[s_tir.schedule.SBlockRV] = field(default_factory=list)
    output_is_param: bool = False  # no epilogue: the conv writes the function's output

    @property
    def groups(self) -> int:
        return self.in_channels // self.in_per_group

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def kind(self) -> str:
        """'dense', 'depthwise' or 'grouped'."""
        if self.groups == 1:
            return "dense"
        if self.in_per_group == 1 and self.out_per_group == 1:
            return "depthwise"
        return "grouped"

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: a GEMM over channels and flattened pixels."""
        return (
            self.kernel == (1, 1)
            and self.stride == (1, 1)
            and (not self.input_is_padded or self.pad_is_identity)
        )

    def describe(self) -> str:
        kh, kw = self.kernel
        return (
            f"{self.kind} conv {self.in_channels}->{self.out_channels} g{self.groups} "
            f"{kh}x{kw} s{self.stride[0]} out {self.out_h}x{self.out_w} {self.dtype}"
        )


def _const(expr) -> int | None:
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _linear(expr, variables) -> list[int] | None:
    """Integer coefficients of ``expr`` in ``variables`` (plus the constant), or None."""
    coeffs = arith.detect_linear_equation(expr, list(variables))
    if len(coeffs) != len(variables) + 1:
        return None
    out = []
    for c in coeffs:
        value = _const(arith.Analyzer().simplify(c))
        if value is None:
            return None
        out.append(value)
    return out


def find_conv(sch: s_tir.Schedule) -> ConvInfo | str:
    """The single conv2d block of ``sch``'s function with its pad and epilogue blocks.

    Returns:
        A ``ConvInfo``, or a string saying why the function is not a schedulable conv.
    """
    root = sch.get_sblock("root")
    blocks = list(sch.get_child_blocks(root))
    allocated = list(sch.get(root).alloc_buffers)

    def is_param(buffer) -> bool:
        return not any(buffer.same_as(a) for a in allocated)

    conv_idx = _reduction_index(sch, blocks)
    if isinstance(conv_idx, str):
        return conv_idx
    rv = blocks[conv_idx]
    operands = _conv_operands(sch.get(rv))
    if isinstance(operands, str):
        return operands
    out, weight, data, extents, row, col = operands
    shape = [_const(s) for s in data.source.shape]
    wshape = [_const(s) for s in weight.source.shape]
    k_out, c_per_group, kh, kw = (_const(e) for e in extents[1:2] + extents[4:7])
    out_h, out_w = _const(extents[2]), _const(extents[3])
    if None in (shape[1], k_out, c_per_group, kh, kw, out_h, out_w) or None in wshape:
        return "symbolic channel, spatial or kernel size"
    in_channels = shape[1]
    if in_channels % c_per_group or k_out % (in_channels // c_per_group):
        return "channel counts do not divide into groups"
    input_is_padded = not is_param(data.source)
    pad = _pad_producer(sch, blocks[:conv_idx], data, shape) if input_is_padded else (None, False)
    if isinstance(pad, str):
        return pad
    pad_block, pad_is_identity = pad
    problem = _blocks_around(sch, blocks, conv_idx, pad_block)
    if problem:
        return problem
    return ConvInfo(
        block=rv,
        batch=_const(extents[0]) if _const(extents[0]) is not None else extents[0],
        in_channels=in_channels,
        out_channels=k_out,
        in_per_group=c_per_group,
        out_h=out_h,
        out_w=out_w,
        kernel=(kh, kw),
        stride=(row[0], col[0]),
        dilation=(row[1], col[1]),
        dtype=str(out.source.dtype),
        input_is_padded=input_is_padded,
        pad_block=pad_block,
        weight_param=str(weight.source.name),
        weight_is_param=is_param(weight.source),
        pad_is_identity=pad_is_identity,
        epilogue=blocks[conv_idx + 1 :],
        output_is_param=is_param(out.source),
    )


def _reduction_index(sch: s_tir.Schedule, blocks: list) -> int | str:
    """Index of the one block with a reduction axis, or why there is not exactly one."""
    conv_idx, reductions = None, 0
    for i, rv in enumerate(blocks):
        if any(int(iv.iter_type) == _REDUCE for iv in sch.get(rv).iter_vars):
            reductions += 1
            conv_idx = i
    if reductions == 0:
        return "no reduction block"
    if reductions > 1:
        return "more than one reduction block"
    return conv_idx


def _conv_operands(block) -> tuple | str:
    """(output, weight, input regions, iteration extents, row and column (stride, dilation))
    of an NCHW conv block, or why it is not one."""
    kinds = [int(iv.iter_type) for iv in block.iter_vars]
    if kinds != [_SPATIAL] * 4 + [_REDUCE] * 3:
        return "reduction block is not an NCHW 2-D conv (iteration types)"
    n, f, y, x, rc, ry, rx = (iv.var for iv in block.iter_vars)
    extents = [iv.dom.extent for iv in block.iter_vars]
    if len(block.writes) != 1:
        return "conv block writes more than one buffer"
    out = block.writes[0]
    if [r.min.same_as(v) or _same(r.min, v) for r, v in zip(out.region, (n, f, y, x))] != [
        True
    ] * 4:
        return "conv output is not indexed [n, f, y, x]"
    weight = data = None
    for read in block.reads:
        if read.source.same_as(out.source):
            continue
        mins = [r.min for r in read.region]
        if len(mins) == 4 and all(_same(m, v) for m, v in zip(mins, (f, rc, ry, rx))):
            weight = read
        else:
            data = read
    if weight is None or data is None or len(data.region) != 4:
        return "conv block does not read an OIHW weight and an NCHW input"
    idx = [r.min for r in data.region]
    row = _linear(idx[2], [y, ry])
    col = _linear(idx[3], [x, rx])
    if not _same(idx[0], n) or row is None or col is None:
        return "input rows/columns are not linear in the output position and the kernel tap"
    return out, weight, data, extents, row, col


def _pad_producer(sch: s_tir.Schedule, before: list, data, shape: list) -> tuple | str:
    """(the block that pads the conv's input, whether it only copies), or why there is none."""
    producers = [p for p in before if sch.get(p).writes[0].source.same_as(data.source)]
    if len(producers) != 1:
        return "conv input is neither a parameter nor produced by one block"
    pad_in = [r.source for r in sch.get(producers[0]).reads]
    return producers[0], len(pad_in) == 1 and [_const(d) for d in pad_in[0].shape] == shape


def _blocks_around(sch: s_tir.Schedule, blocks: list, conv_idx: int, pad_block) -> str | None:
    """Why the blocks before and after the conv are not just its padding and epilogue."""
    if conv_idx != len(blocks) - 1 and any(
        any(int(iv.iter_type) != _SPATIAL for iv in sch.get(b).iter_vars)
        for b in blocks[conv_idx + 1 :]
    ):
        return "non-elementwise block after the conv"
    others = [
        b for b in blocks[:conv_idx] if pad_block is None or not _same_block(sch, b, pad_block)
    ]
    if others:
        return "blocks before the conv other than padding"
    return None


def _same(a, b) -> bool:
    return bool(a.same_as(b)) or (
        isinstance(a, tirx.Var) is False and arith.Analyzer().can_prove_equal(a, b)
    )


def _same_block(sch: s_tir.Schedule, a, b) -> bool:
    return sch.get(a).same_as(sch.get(b))


def single_epilogue(sch: s_tir.Schedule, conv: ConvInfo):
    """One block that stores the conv's result: the fused elementwise chain folded into its last
    block (the accumulator then lives in registers), or a cache-write stage when there is none."""
    if conv.epilogue:
        for block in conv.epilogue[:-1]:
            sch.compute_inline(block)
        sch.set_scope(conv.block, 0, "local")
        return conv.epilogue[-1]
    return sch.cache_write(conv.block, 0, "local")
