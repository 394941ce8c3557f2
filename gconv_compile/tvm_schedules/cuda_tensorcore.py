"""Tensor cores for float16 grouped convs on CUDA: groups packed into 16-row WMMA tiles.

cuDNN runs narrow grouped convs as implicit GEMMs whose MMA tiles hold several groups; this is
the same idea in TVM. A float16 grouped conv that ``cuda_accumulate`` widened (float32 sums) is
legalised, when ``cuda_plan`` prefers it, as GEMMs over super-groups of ``pack`` consecutive
groups whose weights sit block-diagonally in 16-row tiles (pack x Kg a multiple of 16)::

    weights  W[G*Kg, Cg, kh, kw] --build time--> Wt[S, R, Kp]   block-diagonal; S GEMMs of R rows
                                                               (super-groups x row blocks)
    im2col   X[N, C, H, W]  --inside the shared-memory copy--> col[super, Kp, P]  (never stored)
    gemm     acc[f, p] = sum_k Wt[f // R, f % R, k] * col[super(f), k, p]   WMMA 16x16x16, fp32
    out      Y[n, f, y, x] = epilogue(acc[f, pixel(n, y, x)])

``Kp`` = pack x Cg x kh x kw rounded up to 16 (zero rows and columns), ``P`` the output pixels
rounded up to the pixel tile. The kernel: one block per (GEMM, pixel tile); each warp owns a
16-row fragment row and ``frags_p`` 16-pixel fragments, or, with the reduction split over
``warps_k`` warps (rfactor), a slice of it; the weights and the im2col tile of the whole
reduction are copied to shared memory once (gather, padding and bounds in that copy), the
weight fragments stay in registers, the warps run ``wmma::mma_sync``, store their accumulators
to shared memory, and all threads add the slices and run the fused epilogue: only the final
store is guarded. The accumulator tile lives in dynamic shared memory: TVM's storage planner
would otherwise reuse the float16 tiles' memory for it (an access-type error in TVM 0.27; with
``tirx.merge_static_smem`` a missing barrier, which the CPU execution test caught).

The choice and the tile come from ``gconv_compile.cuda_plan`` (no TVM there). Weights bound at
run time and symbolic shapes keep TVM's own conv (then the CUDA-core schedule).
"""

from __future__ import annotations

import os

import tvm
from tvm import s_tir, te, tirx

from ..cuda_plan import TensorCoreTile, ceil_to, plan
from . import cuda_wmma

MIN_ARCH = 70  # WMMA: Volta and later


def applies(target) -> bool:
    """WMMA exists for the target (sm_70 and later), and ``GCONV_TENSOR_CORES`` is not ``0``
    (the GPU kit builds each float16 conv both ways, to measure what the estimate assumes)."""
    if os.environ.get("GCONV_TENSOR_CORES", "1") == "0":
        return False
    arch = str(target.attrs.get("arch", "")) if target.kind.name == "cuda" else ""
    return arch.startswith("sm_") and int(arch[3:5]) >= MIN_ARCH


# ------------------------------------------------------------------------------ legalisation


def legalize_conv2d(bb, call):
    """LegalizeOps for ``relax.nn.conv2d`` on CUDA: the tensor-core form where ``plan`` picks
    it, TVM's own legalisation otherwise."""
    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
    attrs = call.attrs
    x, w = call.args
    if (int(attrs.groups) == 1 or str(x.ty.dtype) != "float16"
            or str(w.ty.dtype) != "float16" or str(attrs.out_dtype) != "float32"
            or attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW"
            or attrs.out_layout != "NCHW"):  # fmt: skip
        return default(bb, call)
    if not isinstance(w, tvm.ir.expr.Constant):
        # weights bound at run time (--weights-file) would be repacked by a kernel on every
        # run, a launch longer than the conv at batch 1: the CUDA-core kernel takes them
        return default(bb, call)
    shape = [getattr(v, "value", None) for v in (*x.ty.shape, *call.ty.shape)]
    if any(d is None for d in shape):  # a symbolic dimension: the tile needs the pixels
        return default(bb, call)
    f, cg, kh, kw = (int(v) for v in w.ty.shape)
    n, _, oh, ow = shape[4:]
    groups = int(attrs.groups)
    chosen = plan(groups, f // groups, cg, kh * kw, n * oh * ow)
    if not chosen.chosen or cg == 1 and f == groups:
        return default(bb, call)
    tile = chosen.tile
    wt = bb.emit_te(_weights_te, w, groups, chosen.pack, tile.row_blocks,
                    primfunc_name_hint="gconv_tc_weights")  # fmt: skip
    fields = ",".join(str(getattr(tile, name)) for name in TensorCoreTile.__dataclass_fields__)
    what = (
        f"grouped conv {shape[1]}->{f} g{groups} {kh}x{kw} s{int(attrs.strides[0])} "
        f"out {oh}x{ow} float16: "
    )  # named as the other schedules' decision lines name it
    notes = (what + chosen.describe(), fields, str(chosen.macs))
    return bb.call_te(_conv_te, x, wt, (f, cg, kh, kw), attrs, groups, chosen.pack,
                      (tile.pixels, tile.row_blocks), notes,
                      primfunc_name_hint="conv2d_tensorcore")  # fmt: skip


def _weights_te(w, groups: int, pack: int, row_blocks: int):
    """[super-group x row block, rows per block, reduction]: each super-group's block-diagonal
    weights, zero-padded, its rows cut into ``row_blocks`` GEMMs of their own."""
    f, cg, kh, kw = (int(v) for v in w.shape)
    kg, taps = f // groups, kh * kw
    m2, depth = kg * pack, cg * pack * taps
    block_rows = ceil_to(m2, 16) // row_blocks

    def block_diagonal(sr, m, k):
        s, m = sr // row_blocks, sr % row_blocks * block_rows + m
        c = k // taps
        inside = tirx.all(m < m2, k < depth, m // kg == c // cg)
        value = w[s * m2 + m, c % cg, k % taps // kw, k % kw]
        return tirx.if_then_else(inside, value, tirx.const(0, w.dtype))

    shape = (groups // pack * row_blocks, block_rows, ceil_to(depth, 16))
    return te.compute(shape, block_diagonal, name="gconv_tc_w")


def _conv_te(x, wt, w_shape, attrs, groups: int, pack: int, tile: tuple, notes: tuple):
    n, _, h, w = (int(v) for v in x.shape)
    f, cg, kh, kw = w_shape
    pt, pl, pb, pr = (int(p) for p in attrs.padding)
    (sh, sw), (dh, dw) = (int(s) for s in attrs.strides), (int(d) for d in attrs.dilation)
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    taps, c2 = kh * kw, cg * pack
    tile_px, row_blocks = tile
    gemms, rows, depth = (int(v) for v in wt.shape)  # gemms: super-groups x row blocks
    pixels = n * oh * ow

    def im2col(s, k, p):
        b, y, xx = p // (oh * ow), p // ow % oh, p % ow
        c, ry, rx = k // taps, k % taps // kw, k % kw
        iy, ix = y * sh + ry * dh - pt, xx * sw + rx * dw - pl
        inside = tirx.all(k < c2 * taps, p < pixels, iy >= 0, iy < h, ix >= 0, ix < w)
        return tirx.if_then_else(inside, x[b, s * c2 + c, iy, ix], tirx.const(0, x.dtype))

    padded = ceil_to(pixels, tile_px)
    col = te.compute((gemms // row_blocks, depth, padded), im2col, name="gconv_tc_col")
    # rows of all GEMMs stacked: output channel ff is row ff (pack x Kg fills the 16-row tiles)
    k = te.reduce_axis((0, depth), "k")
    gemm = te.compute(
        (gemms * rows, padded),
        lambda r, p: te.sum(wt[r // rows, r % rows, k].astype("float32")
                            * col[r // rows // row_blocks, k, p].astype("float32"), axis=k),
        name="gconv_tc_gemm",
        # the report's reason and the tile, kept through fusion for the schedule
        attrs={"gconv_plan": notes[0], "gconv_tile": notes[1], "gconv_macs": notes[2]},
    )  # fmt: skip

    def out(b, ff, y, xx):
        return gemm[ff, (b * oh + y) * ow + xx]

    return te.compute((n, f, oh, ow), out, name="gconv_tc_out")


# ---------------------------------------------------------------------------------- schedule


def is_tensorcore(sch: s_tir.Schedule) -> bool:
    return any(sch.get(b).name_hint == "gconv_tc_gemm" for b in _blocks(sch))


def _blocks(sch):
    return sch.get_child_blocks(sch.get_sblock("root"))


def schedule(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, str]:
    """Schedule a fused function built from ``_conv_te``; returns it and the decision line."""
    cuda_wmma.register()
    sch = s_tir.Schedule(func)
    gemm = sch.get_sblock("gconv_tc_gemm")
    why = str(sch.get(gemm).annotations.get("gconv_plan", "tensor cores"))
    last = sch.get(_blocks(sch)[-1])
    depth = int(sch.get(gemm).reads[0].source.shape[-1])
    fields = str(sch.get(gemm).annotations["gconv_tile"]).split(",")
    macs = int(sch.get(gemm).annotations["gconv_macs"])
    tile = TensorCoreTile(*(int(v) for v in fields))
    _, _, oh, ow = (int(v) for v in last.writes[0].source.shape)
    final = _epilogue(sch, oh, ow)
    mma = gemm
    if tile.warps_k > 1:  # each warp sums a slice; the write-back block adds the slices
        _, _, k = sch.get_loops(gemm)
        k_w, _ = sch.split(k, [tile.warps_k, None])
        mma = sch.rfactor(k_w, factor_axis=0)
    warp, k_outer, k_frag, m_inner = _tile_gemm(sch, mma, tile)
    acc = sch.cache_write(mma, 0, "wmma.accumulator")
    sch.reverse_compute_at(acc, warp)
    sch.set_scope(acc, 0, "shared.dyn")
    block_loop = sch.get_loops(mma)[1]  # (GEMM, pixel block)
    if tile.warps_k > 1:  # the slices' sums added by all threads, beside the accumulators
        sch.reverse_compute_at(gemm, block_loop)
        slices, rows, px = sch.get_loops(gemm)[2:]
        sch.reorder(rows, px, slices)  # the slices' loop serial, innermost
        _bind_threads(sch, sch.fuse(rows, px), tile)
        sch.set_scope(gemm, 0, "shared.dyn")
    sch.reverse_compute_at(final, block_loop)
    _spread(sch, final, 2, tile)
    fragments = _stage_inputs(sch, mma, k_outer, k_frag, tile)
    init = sch.decompose_reduction(mma, k_outer)
    _tensorize(sch, mma, init, acc, m_inner, fragments)
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    # read by cuda_static: multiply-adds per thread, padding included (8 lanes' share of a
    # 16x16x16 MMA is 128 each; a warp's tile is 16 rows x frags_p x 16 px)
    func = func.with_attr("gconv.fmas_per_thread", 8 * tile.frags_p * depth // tile.warps_k)
    func = func.with_attr("gconv.macs", macs)
    return func, f"{why}; {tile.describe()}"


def _epilogue(sch, oh: int, ow: int):
    """Inline the crop and the epilogue into the last block; index it like the GEMM's output."""
    blocks = [sch.get(b).name_hint for b in _blocks(sch)]
    last = blocks[-1]
    for name in blocks[blocks.index("gconv_tc_out") : -1]:
        sch.compute_inline(sch.get_sblock(name))
    final = sch.get_sblock(last)
    sch.transform_block_layout(final, lambda n, f, y, x: (f, (n * oh + y) * ow + x))
    return final


def _tile_gemm(sch, gemm, tile: TensorCoreTile):
    loops = sch.get_loops(gemm)  # (rows, pixels[, slice of the reduction], reduction)
    r, p, k = loops[0], loops[1], loops[-1]
    k_w = loops[2] if len(loops) == 4 else None
    s, m_w, m_i = sch.split(r, [None, tile.warps_m, 16])  # a row block is a GEMM of its own
    p_b, p_w, p_f, p_i = sch.split(p, [None, tile.warps_p, tile.frags_p, 16])
    k_o, k_f, k_i = sch.split(k, [None, tile.stage, 16])
    slices = [k_w] if k_w is not None else []
    sch.reorder(s, p_b, *slices, m_w, p_w, k_o, k_f, p_f, m_i, p_i, k_i)
    warp = sch.fuse(m_w, p_w)
    if k_w is not None:  # its own thread axis: fused, the slice index would not be affine
        sch.bind(k_w, "threadIdx.z")
    sch.bind(s, "blockIdx.y")
    sch.bind(p_b, "blockIdx.x")
    sch.bind(warp, "threadIdx.y")
    return warp, k_o, k_f, m_i


def _spread(sch, block, outer: int, tile: TensorCoreTile) -> None:
    """The block's loops below the first ``outer`` ones, spread over all threads."""
    fused = sch.fuse(*sch.get_loops(block)[outer:])
    _bind_threads(sch, fused, tile)


def _bind_threads(sch, loop, tile: TensorCoreTile) -> None:
    """Split ``loop`` over (threadIdx.z =) slices, warps and lanes, and bind them."""
    warps = tile.threads // 32 // tile.warps_k
    if tile.warps_k > 1:
        _, tz, ty, tx = sch.split(loop, [None, tile.warps_k, warps, 32])
        sch.bind(tz, "threadIdx.z")
    else:
        _, ty, tx = sch.split(loop, [None, warps, 32])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def _stage_inputs(sch, gemm, k_outer, k_frag, tile: TensorCoreTile) -> list:
    """Weights and the im2col tile to shared memory per stage (the gather inlined into the
    copy), then to WMMA fragments: the weights' once per stage, the im2col's per 16-deep step."""
    weights = sch.cache_read(gemm, 0, "shared")
    columns = sch.cache_read(gemm, 1, "shared")
    for cache in (weights, columns):
        sch.compute_at(cache, k_outer)
    sch.compute_inline(sch.get_sblock("gconv_tc_col"))
    for cache in (weights, columns):
        loops = sch.get_loops(cache)
        at = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(k_outer)))
        _bind_threads(sch, sch.fuse(*loops[at + 1 :]), tile)
    fragments = []
    for index in (0, 1):
        fragments.append(sch.cache_read(gemm, index, f"wmma.matrix_{'ab'[index]}"))
        # the weights' fragments stay where cache_read put them, beside their shared copy: once
        # per stage (the whole reduction, kept in registers); the im2col ones per 16-deep step
        if index == 1:
            sch.compute_at(fragments[-1], k_frag)
    return fragments


def _tensorize(sch, gemm, init, acc, m_inner, fragments) -> None:
    a_frag, b_frag = fragments
    rows, depth = sch.get_loops(a_frag)[-2:]
    rows_o, rows_i = sch.split(rows, [None, 16])
    depth_o, depth_i = sch.split(depth, [None, 16])
    sch.reorder(rows_o, depth_o, rows_i, depth_i)
    sch.tensorize(rows_i, cuda_wmma.LOAD_A)
    depth, px = sch.get_loops(b_frag)[-2:]
    px_o, px_i = sch.split(px, [None, 16])
    sch.reorder(px_o, depth, px_i)
    sch.tensorize(depth, cuda_wmma.LOAD_B)
    sch.tensorize(m_inner, cuda_wmma.SYNC)
    sch.tensorize(sch.get_loops(init)[-2], cuda_wmma.FILL)
    rows, px = sch.get_loops(acc)[-2:]
    rows_o, rows_i = sch.split(rows, [None, 16])
    px_o, px_i = sch.split(px, [None, 16])
    sch.reorder(rows_o, px_o, rows_i, px_i)
    sch.tensorize(rows_i, cuda_wmma.STORE_DYN)
