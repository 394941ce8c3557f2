"""CUDA schedules for grouped and depthwise NCHW conv2d: an implicit GEMM per group.

Per group g the conv is a GEMM ``out[k, p] = sum_r W[g*Kg + k, r] * im2col(inp)[g, r, p]`` with
``k < Kg`` output channels, ``p`` output pixels and ``r`` over (input channel of the group, tap).
The tile (``cuda_tiles.choose_tile``) divides the output exactly, so no loop below has a bounds
check::

    blockIdx.z = n, blockIdx.y = group (or block of whole groups), blockIdx.x = (channel tile
        inside the group, row tile, column tile)
    threadIdx.x = (reduction slice, channel lane, row lane, column lane)
    for rc_o:                                   # input-channel stages (one when it all fits)
        shared  W_s[ch tile, rc_i, kh, kw]      # cooperative loads by all threads
        shared  X_s[channels, rows, cols]       # the input window of the tile (padding folded
                                                #   into the load, no pad kernel)
        for rc_i, ry, rx: acc[f_t, x_t] += W_s * X_s     # f_t x x_t outputs per thread, unrolled
    out = epilogue(acc)                          # bias, BN, activation, residual: fused

With a reduction slice (``k_split`` > 1, stages 3-4 of ResNeXt, where a register tile that
fills a thread would leave SMs idle) each thread sums its slice of the input channels, the
partial sums meet in shared memory, and one thread per output adds them and runs the epilogue.
float16 convs that ``cuda_accumulate`` widened accumulate in float32.

Depthwise convs (one input and one output channel per group) take the same path: channel tiles
of whole "groups" when the image is small, spatial tiles with the input halo in shared memory
when it is large. Dense convs are left to dlight's Matmul rule (tensor cores in float16).
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.target import Target

from . import cuda_tensorcore
from ._conv import ConvInfo, find_conv, single_epilogue
from .cuda_tiles import CudaTile, choose_tile, fmas_per_thread

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
    if cuda_tensorcore.is_tensorcore(sch):
        scheduled, why = cuda_tensorcore.schedule(func)
        return scheduled, "cuda-grouped-tensorcore", why, None
    conv = find_conv(sch)
    if isinstance(conv, str):
        return None, "", conv, None
    if conv.kind == "dense":
        return None, "", f"{conv.describe()}: dense, left to dlight's Matmul rule", None
    tile = choose_tile(conv)
    inputs = {str(r.source.name): str(r.source.dtype) for r in sch.get(conv.block).reads}
    widened = inputs.get(conv.weight_param, conv.dtype) != conv.dtype
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
    func = func.with_attr("gconv.fmas_per_thread", fmas_per_thread(conv, tile))
    if widened:  # cuda_accumulate's pass made the conv's own dtype the accumulator's
        why += f"; {inputs[conv.weight_param]} inputs, {conv.dtype} accumulators"
    return func, form_name, f"{conv.describe()}: {why}; {tile.describe()}", None


def schedule_fallback(
    func: tirx.PrimFunc, target: Target, *, constant_params: frozenset[str] = frozenset()
) -> tuple[None, str, None]:
    """Nothing: dlight's default rules schedule the other GPU functions."""
    return None, "left to dlight", None


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
    if tile.k_split > 1:
        _apply_split(sch, conv, tile, (x_shared, w_shared), epilogue)
        return
    n, f, y, x, rc, ry, rx = sch.get_loops(block)
    rc_o, rc_i = sch.split(rc, [None, tile.rc_i])
    block_tile, threads, inner = _tile_loops(
        sch, tile, conv.out_per_group, (n, f, y, x), (rc_o,), (rc_i, ry, rx)
    )
    _unroll(sch, conv, tile, inner)
    for cache in (x_shared, w_shared):
        _cooperative_load(sch, cache, rc_o, tile.threads)
    sch.decompose_reduction(block, rc_o)
    sch.reverse_compute_at(epilogue, threads, preserve_unit_loops=True)


def _apply_split(sch: s_tir.Schedule, conv: ConvInfo, tile: CudaTile, caches, epilogue) -> None:
    """Each output summed by k_split threads over slices of the input channels: partial sums
    in registers, then shared memory, then one thread per output adds them up."""
    final = conv.block
    n, f, y, x, rc, ry, rx = sch.get_loops(final)
    rc_s, rc_r = sch.split(rc, [tile.k_split, None])
    partial = sch.rfactor(rc_s, factor_axis=0)
    sch.set_scope(partial, 0, "shared")
    store = sch.cache_write(partial, 0, "local")
    n, f, y, x, rc_s, rc_r, ry, rx = sch.get_loops(partial)
    block_tile, threads, inner = _tile_loops(
        sch, tile, conv.out_per_group, (n, f, y, x), (), (rc_r, ry, rx), rc_s
    )
    _unroll(sch, conv, tile, inner)
    for cache in caches:
        _cooperative_load(sch, cache, block_tile, tile.threads)
    sch.decompose_reduction(partial, inner[0])
    sch.reverse_compute_at(store, threads, preserve_unit_loops=True)
    sch.reverse_compute_at(final, block_tile, preserve_unit_loops=True)
    loops = sch.get_loops(final)
    at = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(block_tile)))
    # the summing block's loops: the split axis (rfactor put it first), then n, f, y, x
    split_axis, *outputs = loops[at + 1 :]
    sch.reorder(*outputs, split_axis)
    spatial = sch.fuse(*outputs)
    _, tx = sch.split(spatial, [None, tile.threads])
    sch.bind(tx, "threadIdx.x")
    sch.reverse_compute_at(epilogue, tx, preserve_unit_loops=True)


def _tile_loops(sch, tile: CudaTile, kg: int, spatial, outer_reduce, inner_reduce, split_axis=None):
    """Block and thread tiling of the conv's (n, f, y, x) loops; returns the block loop, the
    thread loop and the unrollable inner loops (reduction first, then the register tile)."""
    n, f, y, x = spatial
    f_o, f_tx, f_t = sch.split(f, [None, tile.f_tile // tile.f_t, tile.f_t])
    # group (or group block) and channel tile as separate block axes: the input tile of a block
    # is then provably its own group's channels
    group, f_o = sch.split(f_o, [None, kg // tile.f_tile]) if tile.f_tile < kg else (f_o, None)
    y_o, y_tx = sch.split(y, [None, tile.rows])
    # each thread owns x_t adjacent columns: the epilogue then covers exactly its outputs
    x_o, x_tx, x_t = sch.split(x, [None, tile.cols // tile.x_t, tile.x_t])
    lanes = ([split_axis] if split_axis is not None else []) + [f_tx, y_tx, x_tx]
    tiles = [f_o, y_o, x_o] if f_o is not None else [y_o, x_o]
    sch.reorder(n, group, *tiles, *lanes, *outer_reduce, *inner_reduce, f_t, x_t)
    block_tile = sch.fuse(*tiles)
    threads = sch.fuse(*lanes)
    sch.bind(n, "blockIdx.z")
    sch.bind(group, "blockIdx.y")
    sch.bind(block_tile, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")
    return block_tile, threads, [*inner_reduce, f_t, x_t]


def _unroll(sch, conv: ConvInfo, tile: CudaTile, inner) -> None:
    """Unroll the kernel taps and the register tile; the channel loop too when it is short."""
    channels = tile.rc_i if tile.k_split == 1 else conv.in_per_group // tile.k_split
    fmas = channels * conv.kernel[0] * conv.kernel[1] * tile.outputs_per_thread
    for loop in inner if fmas <= _MAX_UNROLLED_FMAS else inner[1:]:
        sch.unroll(loop)


def _cooperative_load(sch, cache, at, threads: int) -> None:
    """The shared-memory copy at ``at``, spread over the block's threads."""
    sch.compute_at(cache, at, preserve_unit_loops=True)
    all_loops = sch.get_loops(cache)
    index = next(i for i, lp in enumerate(all_loops) if sch.get(lp).same_as(sch.get(at)))
    fused = sch.fuse(*all_loops[index + 1 :])
    _, tx = sch.split(fused, [None, threads])
    sch.bind(tx, "threadIdx.x")
