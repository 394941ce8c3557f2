"""Hand-written llvm (x86/ARM) schedules for NCHW conv2d, dense, grouped and depthwise.

One template covers the three kinds; what changes is the register tile::

    for n, y_blk, f_o, y_o, x_o   (parallel over n * y_blk * f_o)
        acc[y_i, f_i, x_v] = 0                           # vector registers
        for rc, ry, rx:                                  # the group's input channels, the taps
            for y_i, f_i (unrolled), x_v (vectorised):
                acc[y_i, f_i, x_v] += inp[.., y*s + ry*d, x*s + rx*d] * w[f, rc, ry, rx]
        out[...] = epilogue(acc)                         # bias, BN, activation, residual add

- the vector runs along the output row (``x_v``), or along whole rows for a 1x1 stride-1 conv
  with narrow rows (7x7, 14x14 maps), so input loads are contiguous and the weight is a broadcast;
- ``f_i`` output channels of one group share each input vector load (register tiling); for
  depthwise convs (one channel per group) the tile grows along rows instead;
- the accumulator tile lives in registers and the fused epilogue is applied to it before the
  single store, so the conv's intermediate never reaches memory;
- for 1x1 convs the rows are blocked (``y_blk``) so the input panel stays in L2 across all
  output-channel tiles.

Vector width comes from the target's ``mcpu`` (LLVM's own CPU tables: AVX-512 -> 16 float lanes,
AVX2 -> 8, NEON -> 4); ``host_target()`` detects the host.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from gconv_compile.errors import tvm_message
from gconv_compile.targets import host_llvm_target

from ._conv import ConvInfo, find_conv, single_epilogue
from .cpu_epilogue import schedule_epilogue, schedule_pad

logger = logging.getLogger(__name__)

L2_PANEL_BYTES = 256 * 1024  # input panel kept hot across output-channel tiles
MIN_TASKS = 16  # parallel tasks a dense conv's blocking keeps where it can
POINTWISE_CHANNEL_FORM_TAPS = 64  # 1x1 convs with >= this many inputs per group: ties -> channel


@dataclass(frozen=True)
class CpuTile:
    """The register and cache tile chosen for one conv.

    ``form`` is 'pixel' (vector along output pixels, weights broadcast) or 'channel' (vector
    along output channels of one group, pixels broadcast, weights packed OIHW -> O/v,I,H,W,v).
    """

    form: str
    lanes: int  # float32 lanes of one vector register
    vector: int  # elements in the vectorised loop (a power of two)
    f_reg: int  # output-channel steps per register tile (vectors of them in 'channel' form)
    y_reg: int  # output rows per register tile (not for 1x1 stride-1 convs)
    x_reg: int  # pixel steps per register tile (vectors of them in 'pixel' form)
    block: int  # register tiles per L2 block along rows (or flattened pixels)
    split_columns: bool = False  # stride-2 input padded into even and odd columns (contiguous)
    llvm_vectorises: bool = False  # strided rows: LLVM's loop vectoriser deinterleaves them

    @property
    def pixels(self) -> int:
        """Flattened output pixels per register tile along the row (1x1 stride-1 convs)."""
        return self.x_reg * (self.vector if self.form == "pixel" else 1)

    def describe(self) -> str:
        acc = self.f_reg * self.y_reg * self.x_reg
        along = "pixels" if self.form == "pixel" else "output channels"
        split = "; input columns split even/odd" if self.split_columns else ""
        if self.llvm_vectorises:
            split = "; strided rows left to LLVM's vectoriser (whole loads, deinterleaved)"
        return (
            f"{self.form} form: {self.vector}-wide vectors along {along}, "
            f"{acc} accumulators ({self.f_reg} ch x {self.y_reg} row x {self.x_reg} col), "
            f"{self.lanes} lanes{split}"
        )


def host_target(num_cores: int | None = None) -> dict:
    """The llvm target ``gconv-compile compile`` uses on this machine, with ``num_cores`` cores.

    One detector serves both, so benchmarks and tests measure the code users get.
    """

    target = host_llvm_target()
    if num_cores:
        target["num-cores"] = num_cores
    return target


def vector_lanes(target: Target) -> tuple[int, int]:
    """(float32 lanes per vector register, vector registers) for an llvm target.

    Read from the features LLVM gives the target's ``mcpu`` (avx512f: 512-bit, 32 registers;
    avx: 256-bit, 16 registers; else 128-bit). Not ``llvm_get_vector_width``: it answers for the
    machine that compiles, so a haswell build on an AVX-512 machine got 16-lane tiles, each
    accumulator two ymm registers, and spilled (2-20x slower than onnxruntime).
    """
    from tvm.target import codegen

    bits = 128
    if target.kind.name == "llvm" and "x86" in str(target.attrs.get("mtriple", "x86")):
        try:
            with target:
                if codegen.target_has_features("avx512f", target):
                    bits = 512
                elif codegen.target_has_features("avx", target):
                    bits = 256
        except Exception:  # noqa: BLE001 - an LLVM without these features: keep 128 bits
            logger.debug("no LLVM features for %s; assuming 128 bits", target)
    lanes = max(bits // 32, 4)
    registers = 32 if bits >= 512 else 16
    return lanes, registers


def _divisors(n: int, cap: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (cap is None or d <= cap)]


def _pow2_divisor(n: int, cap: int) -> int:
    v = 1
    while v * 2 <= cap and n % (v * 2) == 0:
        v *= 2
    return v


def _lane_use(vector: int, lanes: int) -> float:
    # Half-width vectors run at full FLOP rate on cores that split 512-bit ops (Zen 4) and at
    # half rate elsewhere; count them as 0.75 where registers hold 16 lanes. On AVX2 a 4-wide
    # vector is half the machine (the 0.75 made a ResNeXt 28x28 grouped conv take the 4-wide
    # pixel form, 1.8x slower than the channel form), and a vector of 7 is split into 4+2+1.
    if vector >= lanes:
        return 1.0
    if lanes >= 16 and 2 * vector >= lanes:
        return 0.75
    pieces = 0.75 if vector & (vector - 1) else 1.0
    return pieces * vector / lanes


def _can_split_columns(conv: ConvInfo, padded_width: int | None) -> bool:
    """A stride-2 depthwise conv padding its own input can pad it into even and odd columns.

    Its pixel vectors then load contiguous columns instead of gathering every other one. Only
    depthwise convs (the others have the channel form, which needs no gather), and only for
    output rows of at most 8: measured one thread on the AVX-512 EPYC of issue #14, the split
    took 576@14x14 from 48 to 27 us, but 192@28x28 from 54 to 109 us and 96@112x112 from 420
    to 770 us (writing the split panel costs more than the gather saves on long rows).
    """
    return (
        conv.kind == "depthwise"
        and conv.out_w <= 8
        and conv.stride[1] == 2
        and conv.dilation[1] == 1
        and padded_width is not None
        and padded_width % 2 == 0
    )


def _row_vector(row_len: int, lanes: int, pow2: int) -> int:
    """A vector that divides a row (7, 14, 28 pixels; 196 for a 14x14 1x1 conv) better than
    its power-of-two divisor.

    The channel form needs several output channels per group, so a depthwise conv on a 7x7 or
    14x14 map had only 1-wide (scalar) code; a 7- or 14-wide vector (LLVM splits it into
    register-sized parts, with a partial last one) is 3-7x faster. ShuffleNet's 1x1 convs with
    68 channels per group on 14x14 maps ran 4-wide; 14-wide they take 0.6-0.75x the time.
    """
    best = pow2
    for d in range(4, lanes + 1):
        if row_len % d == 0 and _lane_use(d, lanes) > _lane_use(best, lanes):
            best = d
    # a split vector must pay for its extra loads: on AVX2, 4-wide beat 7-wide on 28-px rows
    # (72 vs 92 us), 7-wide beat 1-wide on 14 and 7 (50 vs 66, 40 vs 50 us; one thread)
    return best if _lane_use(best, lanes) > 1.5 * _lane_use(pow2, lanes) else pow2


def _small_map_extra_accumulators(conv: ConvInfo, registers: int) -> int:
    """Two more accumulators (4 x 7, all 32 registers with broadcasts from memory) for 1x1
    convs on maps of <= 49 pixels with long reductions, where 7 pixels is the widest tile.

    In the models, 2 threads, AVX-512 EPYC: ResNeXt-50's 1024->2048 and 2048->1024 on 7x7 and
    MobileNetV2's 320->1280 and 960->320 took 0.87-0.91x the time of 2 x 7; its 160->960 took
    1.14x (3 x 7 before), and 3x3 convs spilled.
    """
    if registers > 16 and conv.is_pointwise and conv.out_h * conv.out_w <= 49:
        return 2 if conv.in_per_group >= 256 else 0
    return 0


def _depthwise_channels(conv: ConvInfo, f: int, accumulators: int, budget: int) -> int:
    """Two channels per tile for a stride-1 depthwise conv whose rows fill half the registers
    (7x7, 14x14 maps): MobileNetV2's 960@7x7 20.0 -> 17.2 us alone, 2 threads, AVX-512 EPYC
    (three channels: 21.8); ShuffleNet's and MobileNetV2's models 0.99x (performance.md)."""
    if conv.kind != "depthwise" or conv.stride != (1, 1) or conv.out_channels % 2:
        return f
    return 2 if 2 * accumulators <= budget else 1


def _pixel_channels(conv: ConvInfo, budget: int, registers: int) -> tuple[list[int], int]:
    """Channel steps and budget of a pixel tile: a grouped 1x1 conv's may straddle groups (34
    or 68 per group) and take 4 x 7 with AVX-512 (ShuffleNet's 136 g4 on 28x28: 30.9 -> 21.3 us)."""
    if conv.kind == "grouped" and conv.is_pointwise and registers > 16:
        return _divisors(conv.out_channels, 8), budget + 2
    return _divisors(conv.out_per_group, 8), budget


def _split_vector_loads(conv: ConvInfo, vector: int, lanes: int) -> int:
    """Loads LLVM makes for a 1x1 conv's pixel vector of row-dividing width, 14 = 8 + 4 + 2
    (AVX-512 only): ShuffleNet's 272 g4 on 14x14 then takes 4 x 2, not 2 x 7 (37 -> 25 us)."""
    if not conv.is_pointwise or lanes < 16 or vector >= lanes or not vector & (vector - 1):
        return 1
    return bin(vector).count("1")


def _best_register_tile(budget: int, f_opts: list[int], x_opts: list[int], y_opts: list[int], pixel_loads: int = 1) -> tuple[float, int, int, int] | None:  # fmt: skip
    """Best (score, f, y, x) register tile: most FMAs per load, then most accumulators.

    ``pixel_loads``: loads per pixel operand (a 14-wide vector is three: 8 + 4 + 2 lanes).
    """
    best = None
    for f in f_opts:
        for y in y_opts:
            for x in x_opts:
                acc = f * y * x
                if acc > budget:
                    continue
                loads = f + y * x * pixel_loads  # channel operands, then pixel operands
                key = (acc / loads, acc)
                if best is None or key > best[0]:
                    best = (key, f, y, x)
    if best is None:
        return None
    return best[0][0], best[1], best[2], best[3]


def choose_tile(
    conv: ConvInfo,
    lanes: int,
    registers: int,
    *,
    can_pack: bool,
    form: str | None = None,
    padded_width: int | None = None,
) -> CpuTile:
    """Pick the form and the register tile for ``conv`` (a static model, no measurement).

    ``form`` ('pixel' or 'channel') restricts the choice where that form applies (for tests).
    ``padded_width``: the width of the conv's own padded input, when it pads.
    """
    # room for the operand vectors and broadcasts of one step; with AVX2's 16 registers 12
    # accumulators (3 ch x 4 px) beat 8 on MobileNetV2's 1x1 convs by 7-10% (one thread)
    budget = registers - (4 if registers <= 16 else 6)
    pointwise = conv.is_pointwise
    budget += _small_map_extra_accumulators(conv, registers)
    # Flattened output pixels of one row unit: 1x1 stride-1 convs read whole planes contiguously.
    row_len = conv.out_h * conv.out_w if pointwise else conv.out_w
    rows = 1 if pointwise else conv.out_h
    depthwise = conv.kind == "depthwise"
    # depthwise: one channel per tile, so rows are the only source of independent accumulators
    y_opts = [1] if pointwise else _divisors(rows, 8 if depthwise else 4)
    candidates = []
    # pixel form: vectors along the row; a tile must not straddle rows unevenly (1x1 convs)
    x_vec = _pow2_divisor(row_len, lanes)
    if _lane_use(x_vec, lanes) < 0.75:
        row_vec = _row_vector(row_len, lanes, x_vec)
        # other convs have the channel form too: a row vector only where it fills half a register
        if depthwise or _lane_use(row_vec, lanes) >= 0.75:
            x_vec = row_vec
    if x_vec >= 4:
        x_opts = [
            x for x in _divisors(row_len // x_vec, 8)
            if not pointwise or conv.out_w % (x * x_vec) == 0 or (x * x_vec) % conv.out_w == 0
        ]  # fmt: skip
        # strided convs gather their pixel vectors element by element
        split = _can_split_columns(conv, padded_width)
        gather = conv.stride[1] > 1 and not split
        p_y_opts = y_opts
        if depthwise and gather and conv.out_w > 28:
            # long gathered rows: one vector per row, up to 4 rows. Measured 2 threads on the
            # AVX-512 EPYC of issue #14, MobileNetV2's 96@112 s2: 4x1 tiles 177-180 us, 2x7
            # (the FMA-per-load pick) 213, 4x7 240, 8x1 210+, even/odd split 380+
            x_opts = [1]
            p_y_opts = [y for y in y_opts if y <= 4]
        f_opts, p_budget = _pixel_channels(conv, budget, registers)
        tile = _best_register_tile(
            p_budget, f_opts, x_opts, p_y_opts, _split_vector_loads(conv, x_vec, lanes)
        )
        if tile:
            score, f, y, x = tile
            f = _depthwise_channels(conv, f, y * x, budget)
            use = _lane_use(x_vec, lanes) / (2 * conv.stride[1] if gather else 1)
            candidates.append((use, score, CpuTile("pixel", lanes, x_vec, f, y, x, 1, split)))
    f_vec = _pow2_divisor(conv.out_per_group, lanes)
    if can_pack and f_vec >= 4:
        f_opts = _divisors(conv.out_per_group // f_vec, 4)
        x_opts = [
            x for x in _divisors(row_len, 12)
            if not pointwise or conv.out_w % x == 0 or x % conv.out_w == 0
        ]  # fmt: skip
        tile = _best_register_tile(budget, f_opts, x_opts, y_opts)
        if tile:
            score, f, y, x = tile
            # the channel form stores its vectors lane by lane (NCHW output): worth it only
            # when each output takes >= 32 FMAs (measured 1x1 convs at 56-112 px, one thread:
            # 16 or 24 input channels ran 1.6-2x slower than the pixel form, 32 the same)
            taps = conv.in_per_group * conv.kernel[0] * conv.kernel[1]
            use = _lane_use(f_vec, lanes) * min(1.0, taps / 32)
            candidates.append((use, score, CpuTile("channel", lanes, f_vec, f, y, x, 1)))
    if not candidates:
        x_opts = _divisors(row_len, 8)
        _, f, y, x = _best_register_tile(budget, _divisors(conv.out_per_group, 8), x_opts, y_opts)
        return _with_block(conv, CpuTile("pixel", lanes, 1, f, y, x, 1))
    best = _pick(conv, candidates, form)
    return _with_block(conv, _strided_rows(conv, best))


def _pick(conv: ConvInfo, candidates: list, form: str | None) -> CpuTile:
    """The best (lane use, FMAs per load, tile) candidate; ``form`` where it applies."""
    if form is not None and any(c[2].form == form for c in candidates):
        candidates = [c for c in candidates if c[2].form == form]
    # on a tie, a 1x1 conv with a long reduction takes the channel form: MobileNetV2's 192->32
    # and 144->32 convs on 28x28 ran 0.6x the pixel form's time that way (in the model, 2
    # threads, AVX-512 EPYC); with 32 input channels the pixel form was 1.2x faster
    long_pointwise = conv.is_pointwise and conv.in_per_group >= POINTWISE_CHANNEL_FORM_TAPS
    return max(
        candidates,
        key=lambda c: (c[0] * min(c[1], 3.0), c[1], long_pointwise and c[2].form == "channel"),
    )[2]


def _strided_rows(conv: ConvInfo, tile: CpuTile) -> CpuTile:
    """A stride-2 depthwise conv that gathers its pixel vectors leaves the vector loop to LLVM.

    TVM vectorises ``in[2x + rx]`` lane by lane (a load and an insert per lane); LLVM's loop
    vectoriser loads whole vectors and deinterleaves them with shuffles. The inner loops then
    stay rolled (unrolled, LLVM's vectoriser does not see them). Measured 2 threads on the AVX-512
    EPYC of issue #14, alone: MobileNetV2's 96@112 176 -> 90 us, 144@56 79 -> 35 us, 192@28
    27 -> 18 us; as AVX2 code 207 -> 155, 75 -> 56, but 192@28 (7-wide rows) 28.5 -> 30.5 us,
    so AVX2 keeps TVM's vectors on rows under 28.
    """
    if not (
        tile.form == "pixel"
        and conv.kind == "depthwise"
        and conv.stride[1] > 1
        and not tile.split_columns
        and tile.vector >= 4
        and (conv.out_w >= 28 or tile.lanes >= 16)
    ):
        return tile
    return dataclasses.replace(tile, llvm_vectorises=True)


def _with_block(conv: ConvInfo, tile: CpuTile) -> CpuTile:
    """Block rows (or pixel tiles) so the input panel of one block stays in L2."""
    if conv.is_pointwise:
        units = conv.out_h * conv.out_w // tile.pixels
        unit_bytes = conv.in_per_group * tile.pixels * 4
    else:
        units = conv.out_h // tile.y_reg
        unit_bytes = (
            conv.in_per_group * tile.y_reg * conv.stride[0] * conv.out_w * conv.stride[1] * 4
        )
    if conv.groups == 1:
        # a 1x1 strided conv reads one input row per output row, not ``stride`` rows
        rows = min(tile.y_reg * conv.stride[0], (tile.y_reg - 1) * conv.stride[0] + conv.kernel[0])
        if not conv.is_pointwise:
            unit_bytes = unit_bytes // (tile.y_reg * conv.stride[0]) * rows
        block = _dense_block(conv, tile, units, unit_bytes)
    else:
        fits = [b for b in _divisors(units) if b * unit_bytes <= L2_PANEL_BYTES]
        block = max(fits) if fits else 1
    return dataclasses.replace(tile, block=block)


def _dense_block(conv: ConvInfo, tile: CpuTile, units: int, unit_bytes: int) -> int:
    """The block of a dense conv that moves the fewest bytes from beyond L2.

    Each block re-reads every weight (the output-channel tiles run inside it), and each
    output-channel tile re-reads the block's input panel, from L2 when it fits. Blocking
    only for the input made ResNeXt-50's 2048->1024 conv on 7x7 read its 8 MB of weights
    7 times per run (one block per 7-pixel tile).
    """
    kh, kw = conv.kernel
    weight_bytes = conv.out_channels * conv.in_per_group * kh * kw * 4
    f_tile = tile.f_reg * (tile.vector if tile.form == "channel" else 1)
    f_tiles = max(conv.out_channels // f_tile, 1)
    # AVX-512 x86 cores have 1-2 MB of L2 (Skylake-SP, Ice Lake-SP, Zen 4/5), AVX2 ones 256 KB+
    panel = L2_PANEL_BYTES * (2 if tile.lanes >= 16 else 1)

    def traffic(block: int) -> int:
        blocks, panel_bytes = units // block, block * unit_bytes
        input_reads = 1 if panel_bytes <= panel else f_tiles
        return weight_bytes * blocks + units * unit_bytes * input_reads

    # enough parallel tasks, then the fewest bytes, then the most tasks
    options = [b for b in _divisors(units) if units // b * f_tiles >= MIN_TASKS] or [1]
    return min(options, key=lambda b: (traffic(b), b))


@dataclass
class Packing:
    """A weight parameter whose layout the schedule changed: OIHW -> (O/v, I, H, W, v)."""

    param: str
    vector: int

    def pack(self, weight):
        """Apply the layout change to a numpy OIHW weight."""
        o, i, h, w = weight.shape
        v = self.vector
        return weight.reshape(o // v, v, i, h, w).transpose(0, 2, 3, 4, 1).copy()

    def describe(self) -> str:
        return f"weight {self.param} packed into {self.vector}-channel vectors"


def schedule_conv(
    func: tirx.PrimFunc,
    target: Target,
    *,
    constant_params: frozenset[str] = frozenset(),
    form: str | None = None,
) -> tuple[tirx.PrimFunc | None, str, str, Packing | None]:
    """Schedule the conv in ``func`` for ``target``.

    Args:
        constant_params: Parameters every caller passes as a constant; when the weight is one,
            the schedule may change its layout (the caller then packs the constants, see
            ``Packing``).
        form: Prefer this form ('pixel' or 'channel') where it applies (tests use it).

    Returns:
        (scheduled function, form, what was done, weight packing or None), or
        (None, '', why the function was left alone, None).
    """
    sch = s_tir.Schedule(func)
    conv = find_conv(sch)
    if isinstance(conv, str):
        return None, "", conv, None
    lanes, registers = vector_lanes(target)
    can_pack = conv.weight_is_param and conv.weight_param in constant_params
    padded_width = None
    if conv.pad_block is not None and not conv.pad_is_identity:
        shape = sch.get(conv.pad_block).writes[0].source.shape
        padded_width = int(shape[3]) if isinstance(shape[3], tirx.IntImm) else None
    tile = choose_tile(
        conv, lanes, registers, can_pack=can_pack, form=form, padded_width=padded_width
    )
    try:
        packing, epilogue_note = _apply(sch, conv, tile)
    except Exception as err:  # noqa: BLE001 - TVM raises many kinds; the conv stays unscheduled
        logger.debug("cpu conv schedule failed for %s: %s", conv.describe(), err)
        return None, "", f"{conv.describe()}: schedule failed ({tvm_message(err)})", None
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    detail = f"{conv.describe()}: {tile.describe()}{epilogue_note}"
    return func, f"cpu-{conv.kind}-conv", detail, packing


def _apply(sch: s_tir.Schedule, conv: ConvInfo, tile: CpuTile) -> tuple[Packing | None, str]:
    block = conv.block
    if conv.pad_block is not None and conv.pad_is_identity:
        sch.compute_inline(conv.pad_block)
    epilogue = single_epilogue(sch, conv)
    packing = _set_layouts(sch, conv, tile, epilogue)
    if tile.split_columns and tile.form == "pixel":
        sch.transform_layout(
            conv.pad_block, ("write", 0), lambda n, c, y, x: (n, c, y, x % 2, x // 2)
        )
    n, f, y, x, rc, ry, rx = sch.get_loops(block)
    if tile.form == "pixel":
        f_o, f_r = sch.split(f, [None, tile.f_reg])
        f_inner = [f_r]
    else:
        f_o, f_r, f_v = sch.split(f, [None, tile.f_reg, tile.vector])
        f_inner = [f_r, f_v]
    if conv.is_pointwise:
        hw = sch.fuse(y, x)
        px_o, px_r = sch.split(hw, [None, tile.pixels])
        blk, px_o = sch.split(px_o, [None, tile.block])
        spatial_outer = [px_o]
        if tile.form == "pixel":
            x_r, x_v = sch.split(px_r, [tile.x_reg, tile.vector])
            spatial_inner = [x_r, x_v]
        else:
            spatial_inner = [px_r]
    else:
        y_o, y_r = sch.split(y, [None, tile.y_reg])
        blk, y_o = sch.split(y_o, [None, tile.block])
        if tile.form == "pixel":
            x_o, x_r, x_v = sch.split(x, [None, tile.x_reg, tile.vector])
            spatial_inner = [y_r, x_r, x_v]
        else:
            x_o, x_r = sch.split(x, [None, tile.x_reg])
            spatial_inner = [y_r, x_r]
        spatial_outer = [y_o, x_o]
    if tile.form == "pixel":
        inner = spatial_inner[:-2] + f_inner + spatial_inner[-2:]
    else:
        inner = spatial_inner + f_inner
    sch.reorder(n, blk, f_o, *spatial_outer, rc, ry, rx, *inner)
    anchor = spatial_outer[-1]
    task = sch.fuse(n, blk, f_o)
    sch.parallel(task)
    if not tile.llvm_vectorises:
        for lp in inner[:-1]:
            sch.unroll(lp)
        sch.vectorize(inner[-1])
    init = sch.decompose_reduction(block, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    epilogue_note = schedule_epilogue(sch, conv, tile, epilogue, anchor)
    if conv.pad_block is not None and not conv.pad_is_identity:
        schedule_pad(sch, conv.pad_block, task)
    return packing, epilogue_note


def _set_layouts(sch: s_tir.Schedule, conv: ConvInfo, tile: CpuTile, epilogue) -> Packing | None:
    """Lay out the accumulator (and the weight, in channel form) for the tile."""
    block = conv.block
    width = conv.out_w
    packing = None
    if conv.is_pointwise:
        # A 1x1 tile is a run of flattened pixels that may start mid-row: index the accumulator
        # and the epilogue by the flattened pixel so the tile's offsets are constants (else the
        # accumulators cannot live in registers).
        if tile.form == "channel":
            v = tile.vector
            sch.transform_layout(
                block, ("write", 0), lambda n, f, y, x: (n, f // v, y * width + x, f % v)
            )
        else:
            sch.transform_layout(block, ("write", 0), lambda n, f, y, x: (n, f, y * width + x))
        sch.transform_block_layout(epilogue, lambda n, f, y, x: (n, f, y * width + x))
    elif tile.form == "channel":
        v = tile.vector
        sch.transform_layout(block, ("write", 0), lambda n, f, y, x: (n, f // v, y, x, f % v))
    if tile.form == "channel":
        v = tile.vector
        w_index = [
            i for i, r in enumerate(sch.get(block).reads) if str(r.source.name) == conv.weight_param
        ]
        sch.transform_layout(
            block, ("read", w_index[0]), lambda f, c, h, w: (f // v, c, h, w, f % v)
        )
        packing = Packing(conv.weight_param, v)
    return packing


def schedule_fallback(
    func: tirx.PrimFunc, target: Target, *, constant_params: frozenset[str] = frozenset()
) -> tuple[tirx.PrimFunc | None, str, object | None]:
    """Schedule what is not a conv: the classifier's matmul (its constant weight repacked,
    ``cpu_matmul.MatmulPacking``), else pooling, elementwise chains and small reductions
    (``cpu_fallback``). Returns (function or None, what was done, weight packing or None)."""
    from .cpu_fallback import schedule_loops
    from .cpu_matmul import schedule_matmul

    matmul, why, packing = schedule_matmul(func, vector_lanes(target)[0], constant_params)
    if matmul is not None:
        return matmul, why, packing
    return (*schedule_loops(func), None)
