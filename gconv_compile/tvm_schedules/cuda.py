"""CUDA schedules for grouped and depthwise NCHW conv2d: an implicit GEMM per group.

Per group g the conv is a GEMM ``out[k, p] = sum_r W[g*Kg + k, r] * im2col(inp)[g, r, p]`` with
``k < Kg`` output channels, ``p`` output pixels and ``r`` over (input channel of the group, tap).
The group is the batch axis of the GEMM: the grid runs over (image, group x channel tile,
pixel tile)::

    blockIdx.z = n, blockIdx.y = channel tile (never straddles a group), blockIdx.x = pixel tile
    threadIdx.x = (channel lane, row lane, column lane)
    for rc_o:                                   # the group's input channels, rc_i at a time
        shared  W_s[ch tile, rc_i, kh, kw]      # cooperative loads by all threads
        shared  X_s[rc_i, rows, cols]           # the input window of the pixel tile (padding
                                                #   folded into the load, no pad kernel)
        for rc_i, ry, rx: acc[f_t, x_t] += W_s * X_s     # f_t x x_t outputs per thread
    out = epilogue(acc)                          # bias, BN, activation, residual: fused

Depthwise convs (one input and one output channel per group) use the same template with a
channel tile of 1 and a larger 2-D pixel tile: spatial tiling with the input halo in shared
memory. Dense convs are left to dlight's Matmul rule (tensor cores in float16).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from ._conv import ConvInfo, find_conv, single_epilogue

logger = logging.getLogger(__name__)

THREADS = 128


@dataclass(frozen=True)
class CudaTile:
    f_tile: int  # output channels per block (divides the channels per group)
    f_t: int  # output channels per thread
    y_tx: int  # thread rows
    x_tx: int  # thread columns
    x_t: int  # output columns per thread
    rc_i: int  # input channels per shared-memory stage

    @property
    def threads(self) -> int:
        return (self.f_tile // self.f_t) * self.y_tx * self.x_tx

    def describe(self) -> str:
        return (
            f"{self.threads} threads, {self.f_t * self.x_t} outputs/thread, block tile "
            f"{self.f_tile} ch x {self.y_tx} x {self.x_tx * self.x_t} px, {self.rc_i} input ch per "
            "shared stage"
        )


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def choose_tile(conv: ConvInfo) -> CudaTile:
    kg = conv.out_per_group
    f_tile = math.gcd(kg, 32)
    f_t = math.gcd(f_tile, 4)
    x_t = 2 if conv.out_w >= 16 else 1
    x_tx = min(_pow2_floor(math.ceil(conv.out_w / x_t)), 16)
    f_tx = f_tile // f_t
    y_tx = max(1, min(THREADS // (f_tx * x_tx), _pow2_floor(conv.out_h)))
    rc_i = math.gcd(conv.in_per_group, 8)
    return CudaTile(f_tile, f_t, y_tx, x_tx, x_t, rc_i)


def schedule_conv(
    func: tirx.PrimFunc,
    target: Target,
    *,
    constant_params: frozenset[str] = frozenset(),
    form: str | None = None,
) -> tuple[tirx.PrimFunc | None, str, str, None]:
    """Schedule a grouped or depthwise conv; dense convs and the rest are left to dlight."""
    del constant_params, form  # weights keep their layout on CUDA
    sch = s_tir.Schedule(func)
    conv = find_conv(sch)
    if isinstance(conv, str):
        return None, "", conv, None
    if conv.kind == "dense":
        return None, "", f"{conv.describe()}: dense, left to dlight's Matmul rule", None
    tile = choose_tile(conv)
    try:
        _apply(sch, conv, tile)
    except Exception as err:  # noqa: BLE001 - TVM raises many kinds; dlight takes the function
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        why = lines[-1][:160] if lines else type(err).__name__
        logger.debug("cuda conv schedule failed for %s: %s", conv.describe(), err)
        return None, "", f"{conv.describe()}: schedule failed ({why}), left to dlight", None
    form_name = "cuda-depthwise-spatial" if conv.kind == "depthwise" else "cuda-grouped-igemm"
    why = "group as GEMM batch axis, shared-memory tiles"
    if conv.kind == "depthwise":
        why = "spatial tiles with the input halo in shared memory"
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    # read by tools that bound the kernel statically (cuda_static)
    func = func.with_attr("gconv.outputs_per_thread", tile.f_t * tile.x_t)
    return func, form_name, f"{conv.describe()}: {why}; {tile.describe()}", None


def schedule_fallback(func: tirx.PrimFunc, target: Target) -> tuple[None, str]:
    """Nothing: dlight's default rules schedule the other GPU functions."""
    return None, "left to dlight"


def _apply(sch: s_tir.Schedule, conv: ConvInfo, tile: CudaTile) -> None:
    block = conv.block
    epilogue = single_epilogue(sch, conv)
    reads = [str(r.source.name) for r in sch.get(block).reads]
    w_idx = reads.index(conv.weight_param)
    x_idx = next(
        i
        for i, name in enumerate(reads)
        if i != w_idx and name != str(sch.get(block).writes[0].source.name)
    )
    x_shared = sch.cache_read(block, x_idx, "shared")
    w_shared = sch.cache_read(block, w_idx, "shared")
    if conv.pad_block is not None:
        sch.compute_inline(conv.pad_block)  # padding folds into the shared-memory load

    n, f, y, x, rc, ry, rx = sch.get_loops(block)
    f_o, f_tx, f_t = sch.split(f, [None, tile.f_tile // tile.f_t, tile.f_t])
    y_o, y_tx = sch.split(y, [None, tile.y_tx])
    # each thread owns x_t adjacent columns: the epilogue then covers exactly its outputs
    x_o, x_tx, x_t = sch.split(x, [None, tile.x_tx, tile.x_t])
    rc_o, rc_i = sch.split(rc, [None, tile.rc_i])
    sch.reorder(n, f_o, y_o, x_o, f_tx, y_tx, x_tx, rc_o, rc_i, ry, rx, f_t, x_t)
    pixel_tile = sch.fuse(y_o, x_o)
    threads = sch.fuse(f_tx, y_tx, x_tx)
    sch.bind(n, "blockIdx.z")
    sch.bind(f_o, "blockIdx.y")
    sch.bind(pixel_tile, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")
    sch.unroll(f_t)
    sch.unroll(x_t)
    for cache in (x_shared, w_shared):
        sch.compute_at(cache, rc_o, preserve_unit_loops=True)
        all_loops = sch.get_loops(cache)
        at = next(i for i, lp in enumerate(all_loops) if sch.get(lp).same_as(sch.get(rc_o)))
        loops = all_loops[at + 1 :]
        fused = sch.fuse(*loops)
        _, tx = sch.split(fused, [None, tile.threads])
        sch.bind(tx, "threadIdx.x")
    sch.decompose_reduction(block, rc_o)
    sch.reverse_compute_at(epilogue, threads, preserve_unit_loops=True)
