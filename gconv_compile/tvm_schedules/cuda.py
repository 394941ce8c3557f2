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

from tvm import s_tir, tirx
from tvm.target import Target

from ._conv import ConvInfo, find_conv, single_epilogue
from .cuda_tiles import CudaTile, choose_tile

logger = logging.getLogger(__name__)

_MAX_UNROLLED_FMAS = 1200  # beyond this the input-channel loop of a stage stays a loop


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
    func = func.with_attr("gconv.outputs_per_thread", tile.outputs_per_thread)
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
    y_o, y_tx = sch.split(y, [None, tile.rows])
    # each thread owns x_t adjacent columns: the epilogue then covers exactly its outputs
    x_o, x_tx, x_t = sch.split(x, [None, tile.cols // tile.x_t, tile.x_t])
    rc_o, rc_i = sch.split(rc, [None, tile.rc_i])
    sch.reorder(n, f_o, y_o, x_o, f_tx, y_tx, x_tx, rc_o, rc_i, ry, rx, f_t, x_t)
    block_tile = sch.fuse(f_o, y_o, x_o)
    threads = sch.fuse(f_tx, y_tx, x_tx)
    sch.bind(n, "blockIdx.y")
    sch.bind(block_tile, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")
    unrolled = [ry, rx, f_t, x_t]
    if tile.rc_i * conv.kernel[0] * conv.kernel[1] * tile.outputs_per_thread <= _MAX_UNROLLED_FMAS:
        unrolled.insert(0, rc_i)
    for loop in unrolled:
        sch.unroll(loop)
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
