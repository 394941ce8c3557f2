"""llvm schedule for the functions that are not convs or matmuls: pooling, elementwise chains
(ShuffleNet's channel shuffle: Relu -> Reshape -> Transpose -> Reshape), small reductions (the
importer writes ONNX ``Sum(a, b)`` as broadcast -> stack -> sum over the stacked axis).

1. Inline every intermediate injective block into its consumer: one pass over memory instead of
   one per op, and one parallel region instead of one per block (ShuffleNet's shuffle had 4, its
   Sum 4, each a thread-pool launch and a full write and read of the tensor).
2. Parallelise the outer spatial loops of each block left, keeping the innermost loop serial so
   LLVM can vectorise it.
3. A block that copies whole planes with short rows (ShuffleNet's channel shuffle on 14x14 and
   7x7 maps) runs one loop over each plane, not one per row.
4. A reduction over a few elements (<= 4, the stacked Sum) moves inside the innermost spatial
   loop's vector: ``for k: out[.., x:x+v] += in[k, .., x:x+v]`` instead of a scalar loop over k
   per output element.
"""

from __future__ import annotations

import logging
import math

from tvm import s_tir, tirx

logger = logging.getLogger(__name__)

SMALL_REDUCTION = 4
SHORT_ROW = 32  # rows shorter than this are fused with the next when a block copies planes


def _inline_intermediates(sch: s_tir.Schedule) -> int:
    """Inline injective blocks into their consumers until none is left; returns how many."""
    root = sch.get_sblock("root")
    inlined = 0
    progress = True
    while progress:
        progress = False
        for block in list(sch.get_child_blocks(root))[:-1]:
            if any(int(iv.iter_type) != 0 for iv in sch.get(block).iter_vars):
                continue  # reductions stay
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - writes an output, or not inlinable: keep it
                continue
            inlined += 1
            progress = True
            break
    return inlined


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def _vectorise_small_reduction(sch: s_tir.Schedule, block, spatial: list, reduce: list) -> bool:
    """Move a reduction of <= 4 elements inside the innermost spatial loop and vectorise it."""
    extents = [_extent(sch, lp) for lp in reduce]
    inner = _extent(sch, spatial[-1])
    if None in extents or inner is None or math.prod(extents) > SMALL_REDUCTION or inner < 4:
        return False
    try:
        sch.reorder(*reduce, spatial[-1])
        init = sch.decompose_reduction(block, reduce[0])
        sch.vectorize(sch.get_loops(block)[-1])
        sch.vectorize(sch.get_loops(init)[-1])
    except Exception:  # noqa: BLE001 - keep the serial reduction
        logger.debug("small reduction not vectorised", exc_info=True)
        return False
    return True


def _fuse_copied_rows(sch: s_tir.Schedule, block, spatial: list) -> list:
    """Fuse the last two spatial loops of a block that copies whole planes (ShuffleNet's
    channel shuffle: every read and the write index the last two axes with the block's own last
    two variables, over the buffers' full extents), so the innermost loop runs over the plane.

    Rows of 14 or 7 floats left a short vector and a scalar tail per row: the shuffle on 14x14
    took 15 us alone, 2.7x the one on 28x28 that moves twice the bytes.
    """
    if len(spatial) < 3:
        return spatial
    extents = [_extent(sch, lp) for lp in spatial[-2:]]
    if None in extents or extents[1] >= SHORT_ROW:
        return spatial
    stmt = sch.get(block)
    y, x = (iv.var for iv in stmt.iter_vars[len(spatial) - 2 : len(spatial)])
    for region in [*stmt.reads, *stmt.writes]:
        shape = region.source.shape
        if len(shape) < 2 or [_const(d) for d in shape[-2:]] != extents:
            return spatial
        mins = [r.min for r in region.region[-2:]]
        if not (mins[0].same_as(y) and mins[1].same_as(x)):
            return spatial
    return [*spatial[:-2], sch.fuse(*spatial[-2:])]


def _const(expr) -> int | None:
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def schedule_loops(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc | None, str]:
    """Inline, parallelise and (small reductions) vectorise the blocks of ``func``."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    try:
        inlined = _inline_intermediates(sch)
    except Exception:  # noqa: BLE001 - no root block and the like: schedule as it is
        sch, inlined = s_tir.Schedule(func), 0
    infos = normalize_prim_func(sch)
    if infos is None:
        return None, "not normalisable"
    done = vectorised = planes = 0
    for info in infos:
        kinds = info.dom_kind()
        loops = sch.get_loops(info.block_rv)
        if len(loops) != len(kinds):
            continue
        spatial = [lp for lp, kind in zip(loops, kinds) if kind == "S"]
        if not spatial or kinds[: len(spatial)] != "S" * len(spatial):
            continue
        reduce = loops[len(spatial) :]
        if not reduce:
            fused = _fuse_copied_rows(sch, info.block_rv, spatial)
            planes += len(fused) < len(spatial)
            spatial = fused
        # keep the innermost loop serial so LLVM can still vectorise it
        outer = spatial[:-1] if len(spatial) > 1 else spatial
        extents = [_extent(sch, lp) for lp in outer]
        if None in extents or math.prod(extents) < 2:
            continue
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        done += 1
        if reduce and len(spatial) > 1:
            vectorised += _vectorise_small_reduction(sch, info.block_rv, spatial, reduce)
    if not done:
        return None, "nothing to parallelise"
    what = f"parallel outer loops of {done} block(s)"
    if inlined:
        what += f", {inlined} block(s) inlined"
    if vectorised:
        what += f", {vectorised} small reduction(s) vectorised"
    if planes:
        what += f", rows fused into planes in {planes} copy block(s)"
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), what
