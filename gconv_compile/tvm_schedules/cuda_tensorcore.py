"""Tensor cores for float16 grouped convs on CUDA: groups packed into 16-row WMMA tiles.

cuDNN runs narrow grouped convs as implicit GEMMs whose MMA tiles hold several groups; this is
the same idea in TVM. A float16 grouped conv that ``cuda_accumulate`` widened (float32 sums) is
legalised, when the estimate below prefers it, as a batched GEMM over super-groups of ``pack``
consecutive groups whose weights sit block-diagonally in one 16-row tile::

    weights  W[G*Kg, Cg, kh, kw]  --constant-->  Wt[G/pack, Mp, Kp]   block-diagonal, zero-padded
    im2col   X[N, C, H, W]        --in the load--> col[G/pack, Kp, P]  (never materialised)
    gemm     acc[s, m, p] = sum_k Wt[s, m, k] * col[s, k, p]           WMMA 16x16x16, float32
    out      Y[n, f, y, x] = epilogue(acc[f // M, f % M, pixel(n, y, x)])

``Mp`` = pack x Kg rounded up to 16, ``Kp`` = pack x Cg x kh x kw rounded up to 16, ``P`` the
output pixels rounded up to the block tile. The kernel: one block per (super-group, pixel tile);
each warp owns one 16-row fragment row and ``wn`` 16-pixel fragments; the weights and the
im2col tile of a reduction stage are copied to shared memory (the im2col gather, padding and
bounds folded into that copy), the warps run ``wmma::mma_sync`` over the stage, then store
their accumulators to shared memory where all threads run the fused epilogue: only the final
store is guarded. The accumulator tile lives in dynamic shared memory: TVM's storage planner
would otherwise reuse the float16 tiles' memory for it (an access-type error in TVM 0.27; with
``tirx.merge_static_smem`` a missing barrier, which the CPU execution test caught).

The choice (``plan``): tensor cores when the padded tensor-core work at the H200's float16
tensor rate beats the useful work at its float32 CUDA-core rate (datasheet rates: 989 and 67
TFLOP/s; replace them with the GPU kit's measurements once there are any). Depthwise convs
(16x padding waste) stay on CUDA cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import s_tir, te, tirx

from . import cuda_wmma

TENSOR_FLOPS = 989e12  # H200 SXM float16 dense tensor-core peak (datasheet)
CUDA_CORE_FLOPS = 67e12  # H200 SXM float32 FMA peak (datasheet)
MIN_ARCH = 70  # WMMA: Volta and later
SMS = 132
MAX_SHARED_BYTES = 48 * 1024  # without the opt-in for more
MIN_FRAGS = 4


def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclass(frozen=True)
class TensorCorePlan:
    groups: int  # the conv's groups
    pack: int  # consecutive groups per super-group (one 16-row tile)
    kg: int  # output channels per group
    cg: int  # input channels per group
    taps: int  # kh * kw
    pixels: int  # N * OH * OW
    tensor_us: float  # estimate, tensor cores
    cuda_core_us: float  # estimate, CUDA cores
    tile: TensorCoreTile | None = None  # None: no tile passes the gates (see choose_tile)

    @property
    def rows(self) -> int:  # Mp
        return _ceil(self.pack * self.kg, 16)

    @property
    def depth(self) -> int:  # Kp
        return _ceil(self.pack * self.cg * self.taps, 16)

    @property
    def waste(self) -> float:
        useful = self.kg * self.cg * self.taps * self.groups
        return self.rows * self.depth * (self.groups // self.pack) / useful

    @property
    def chosen(self) -> bool:
        return self.tile is not None and self.tensor_us < self.cuda_core_us

    def describe(self) -> str:
        verdict = "tensor cores" if self.chosen else "CUDA cores"
        if self.tile is None:
            return (f"CUDA cores: no tensor-core tile fills {SMS} SMs with {MIN_FRAGS}+ "
                    f"accumulator tiles per warp ({self.groups // self.pack} GEMMs of "
                    f"{self.rows}x{self.depth} x {self.pixels} px)")  # fmt: skip
        return (f"{verdict}: {self.pack} group(s) per {self.rows}-row WMMA tile, "
                f"{self.waste:.1f}x padded work, estimate {self.tensor_us:.2f} us on tensor cores "
                f"vs {self.cuda_core_us:.2f} us on CUDA cores (datasheet rates)")  # fmt: skip


def plan(groups: int, kg: int, cg: int, taps: int, pixels: int) -> TensorCorePlan:
    """How the conv would pack, and both estimates."""
    pack = 1
    while (pack * kg) % 16 and groups % (pack * 2) == 0 and pack * kg < 16:
        pack *= 2
    useful = 2.0 * groups * kg * cg * taps * pixels
    probe = TensorCorePlan(groups, pack, kg, cg, taps, pixels, 0.0, 0.0)
    tensor = useful * probe.waste / TENSOR_FLOPS * 1e6
    tile = choose_tile(groups // pack, probe.rows, probe.depth, pixels)
    return TensorCorePlan(groups, pack, kg, cg, taps, pixels, tensor,
                          useful / CUDA_CORE_FLOPS * 1e6, tile)  # fmt: skip


def applies(target) -> bool:
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
    f, cg, kh, kw = (int(v) for v in w.ty.shape)
    n, _, oh, ow = (int(v) for v in call.ty.shape)
    groups = int(attrs.groups)
    chosen = plan(groups, f // groups, cg, kh * kw, n * oh * ow)
    if not chosen.chosen or cg == 1 and f == groups:
        return default(bb, call)
    tile = chosen.tile.pixels
    wt = bb.emit_te(_weights_te, w, groups, chosen.pack, primfunc_name_hint="gconv_tc_weights")
    return bb.call_te(_conv_te, x, wt, (f, cg, kh, kw), attrs, groups, chosen.pack, tile,
                      chosen.describe(), primfunc_name_hint="conv2d_tensorcore")  # fmt: skip


def _weights_te(w, groups: int, pack: int):
    f, cg, kh, kw = (int(v) for v in w.shape)
    kg, taps = f // groups, kh * kw
    m2, depth = kg * pack, cg * pack * taps

    def block_diagonal(s, m, k):
        c = k // taps
        inside = tirx.all(m < m2, k < depth, m // kg == c // cg)
        value = w[s * m2 + m, c % cg, k % taps // kw, k % kw]
        return tirx.if_then_else(inside, value, tirx.const(0, w.dtype))

    return te.compute((groups // pack, _ceil(m2, 16), _ceil(depth, 16)), block_diagonal,
                      name="gconv_tc_w")  # fmt: skip


def _conv_te(x, wt, w_shape, attrs, groups: int, pack: int, tile: int, why: str):
    n, _, h, w = (int(v) for v in x.shape)
    f, cg, kh, kw = w_shape
    pt, pl, pb, pr = (int(p) for p in attrs.padding)
    (sh, sw), (dh, dw) = (int(s) for s in attrs.strides), (int(d) for d in attrs.dilation)
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    taps, m2, c2 = kh * kw, f // groups * pack, cg * pack
    supers, rows, depth = (int(v) for v in wt.shape)
    pixels = n * oh * ow

    def im2col(s, k, p):
        b, y, xx = p // (oh * ow), p // ow % oh, p % ow
        c, ry, rx = k // taps, k % taps // kw, k % kw
        iy, ix = y * sh + ry * dh - pt, xx * sw + rx * dw - pl
        inside = tirx.all(k < c2 * taps, p < pixels, iy >= 0, iy < h, ix >= 0, ix < w)
        return tirx.if_then_else(inside, x[b, s * c2 + c, iy, ix], tirx.const(0, x.dtype))

    col = te.compute((supers, depth, _ceil(pixels, tile)), im2col, name="gconv_tc_col")
    k = te.reduce_axis((0, depth), "k")
    gemm = te.compute(
        (supers, rows, _ceil(pixels, tile)),
        lambda s, m, p: te.sum(wt[s, m, k].astype("float32") * col[s, k, p].astype("float32"),
                               axis=k),
        name="gconv_tc_gemm",
        attrs={"gconv_plan": why},  # the report's reason, kept through fusion
    )  # fmt: skip
    return te.compute((n, f, oh, ow), lambda b, ff, y, xx: gemm[ff // m2, ff % m2,
                      (b * oh + y) * ow + xx], name="gconv_tc_out")  # fmt: skip


# ---------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class TensorCoreTile:
    warps_m: int  # warps along the rows (one 16-row fragment each)
    warps_p: int  # warps along the pixels
    frags_p: int  # 16-pixel fragments per warp
    stage: int  # 16-deep reduction fragments per shared-memory stage

    @property
    def pixels(self) -> int:
        return self.warps_p * self.frags_p * 16

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_p

    def describe(self) -> str:
        return (f"{self.threads} threads ({self.warps_m}x{self.warps_p} warps), "
                f"{self.frags_p} accumulator tile(s) of 16x16 per warp, block tile "
                f"{16 * self.warps_m} rows x {self.pixels} px, {16 * self.stage} reduction "
                "per shared stage")  # fmt: skip


def choose_tile(supers: int, rows: int, depth: int, pixels: int) -> TensorCoreTile | None:
    """The tile for the GEMM (``rows``/``depth``: its padded M and K; ``pixels``: N*OH*OW), or
    None when no tile passes issue #13's gates: >= 64 threads, a full wave of blocks on 132 SMs
    (where 16-pixel tiles could fill one), >= MIN_FRAGS accumulator tiles per warp (with fewer,
    fragment loads and addressing were 60-66% of the MMA loop's instructions on ResNeXt-50's
    shapes), the reduction in one shared stage. Among those: the least pixel padding, the most accumulator
    tiles per warp, the widest pixel tile, the fewest reduction stages."""
    warps_m = rows // 16
    depth_frags = depth // 16
    best, best_key = None, None
    for warps_p in (1, 2, 4, 8):
        for frags_p in (1, 2, 3, 4):
            threads = 32 * warps_m * warps_p
            if threads > 512:
                continue
            tile_px = warps_p * frags_p * 16
            # the whole reduction in one shared stage (a staged loop carries the im2col
            # copy's bounds checks into the MMA loop), float32 accumulators beside it
            shared = 2 * depth * (rows + tile_px) + 4 * rows * tile_px
            if shared > MAX_SHARED_BYTES:
                continue
            stage = depth_frags
            tile = TensorCoreTile(warps_m, warps_p, frags_p, stage)
            blocks = supers * math.ceil(pixels / tile_px)
            padded = _ceil(pixels, tile_px) / pixels
            # more accumulator tiles per warp: more MMAs per fragment load
            # a conv that 16-pixel tiles cannot spread over the SMs underfills them on any
            # kernel; the others must fill a wave
            wave = supers * math.ceil(pixels / 16) >= SMS
            if threads < 64 or (wave and blocks < SMS) or frags_p < MIN_FRAGS:
                continue
            key = (round(padded, 1), -frags_p, -tile_px, -stage)
            if best_key is None or key < best_key:
                best, best_key = tile, key
    return best


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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
    out_shape = [int(v) for v in last.writes[0].source.shape]
    supers, rows, padded_px = (int(v) for v in sch.get(gemm).writes[0].source.shape)
    depth = int(sch.get(gemm).reads[0].source.shape[-1])
    batch, channels, oh, ow = out_shape
    tile = choose_tile(supers, rows, depth, batch * oh * ow)
    final = _epilogue(sch, channels // supers, oh, ow)
    warp, k_outer, k_frag, m_inner = _tile_gemm(sch, gemm, tile)
    acc = sch.cache_write(gemm, 0, "wmma.accumulator")
    sch.reverse_compute_at(acc, warp)
    sch.set_scope(acc, 0, "shared.dyn")
    block_loop = sch.get_loops(gemm)[1]
    sch.reverse_compute_at(final, block_loop)
    _spread(sch, final, 2, tile)
    fragments = _stage_inputs(sch, gemm, k_outer, k_frag, tile)
    init = sch.decompose_reduction(gemm, k_outer)
    _tensorize(sch, gemm, init, acc, m_inner, fragments)
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    # read by cuda_static: multiply-adds per thread, padding included (8 lanes' share of a
    # 16x16x16 MMA is 128 each; a warp's tile is 16 rows x frags_p x 16 px)
    func = func.with_attr("gconv.fmas_per_thread", 8 * tile.frags_p * depth)
    return func, f"{why}; {tile.describe()}"


def _epilogue(sch, per_super: int, oh: int, ow: int):
    """Inline the crop and the epilogue into the last block; index it like the GEMM's output."""
    blocks = [sch.get(b).name_hint for b in _blocks(sch)]
    last = blocks[-1]
    for name in blocks[blocks.index("gconv_tc_out") : -1]:
        sch.compute_inline(sch.get_sblock(name))
    final = sch.get_sblock(last)
    sch.transform_block_layout(final, lambda n, f, y, x: (f // per_super, f % per_super,
                                                          (n * oh + y) * ow + x))  # fmt: skip
    return final


def _tile_gemm(sch, gemm, tile: TensorCoreTile):
    s, m, p, k = sch.get_loops(gemm)
    m_w, m_i = sch.split(m, [tile.warps_m, 16])
    p_b, p_w, p_f, p_i = sch.split(p, [None, tile.warps_p, tile.frags_p, 16])
    k_o, k_f, k_i = sch.split(k, [None, tile.stage, 16])
    sch.reorder(s, p_b, m_w, p_w, k_o, k_f, p_f, m_i, p_i, k_i)
    warp = sch.fuse(m_w, p_w)
    sch.bind(s, "blockIdx.y")
    sch.bind(p_b, "blockIdx.x")
    sch.bind(warp, "threadIdx.y")
    return warp, k_o, k_f, m_i


def _spread(sch, block, outer: int, tile: TensorCoreTile) -> None:
    """The block's loops below the first ``outer`` ones, spread over all threads."""
    fused = sch.fuse(*sch.get_loops(block)[outer:])
    _, ty, tx = sch.split(fused, [None, tile.threads // 32, 32])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def _stage_inputs(sch, gemm, k_outer, k_frag, tile: TensorCoreTile) -> list:
    """Weights and the im2col tile to shared memory per stage (the gather inlined into the
    copy), then to WMMA fragments per 16-deep step."""
    weights = sch.cache_read(gemm, 0, "shared")
    columns = sch.cache_read(gemm, 1, "shared")
    for cache in (weights, columns):
        sch.compute_at(cache, k_outer)
    sch.compute_inline(sch.get_sblock("gconv_tc_col"))
    for cache in (weights, columns):
        loops = sch.get_loops(cache)
        at = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(k_outer)))
        fused = sch.fuse(*loops[at + 1 :])
        _, ty, tx = sch.split(fused, [None, tile.threads // 32, 32])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
    fragments = []
    for index in (0, 1):
        fragments.append(sch.cache_read(gemm, index, f"wmma.matrix_{'ab'[index]}"))
        sch.compute_at(fragments[-1], k_frag)
    return fragments


def _tensorize(sch, gemm, init, acc, m_inner, fragments) -> None:
    a_frag, b_frag = fragments
    rows, depth = sch.get_loops(a_frag)[-2:]
    rows_o, rows_i = sch.split(rows, [None, 16])
    sch.reorder(rows_o, rows_i, depth)
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
