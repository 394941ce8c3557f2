"""How a float16 grouped conv maps onto tensor cores, and whether it should (no TVM here).

``plan`` packs ``pack`` consecutive groups block-diagonally into 16-row GEMM tiles (the
padding it costs is ``waste``), estimates the tensor-core and the CUDA-core time from
``rates()``, and ``choose_tile`` picks the kernel's tile under issue #13's gates.
``tvm_schedules.cuda_tensorcore`` builds and schedules the kernel from them;
``targets.choose_cuda_conv_forms`` weighs them against a dense block-diagonal conv. The rates
are the H200 datasheet's until ``scripts/gpu_rates.py`` writes measured ones from a GPU kit run
(``cuda_rates.json`` beside this module).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

TENSOR_FLOPS = 989e12  # H200 SXM float16 dense tensor-core peak (datasheet)
CUDA_CORE_FLOPS = 67e12  # H200 SXM float32 FMA peak (datasheet)
# Written by scripts/gpu_rates.py from a GPU kit run; absent until a GPU has run the kit.
MEASURED_RATES = Path(__file__).with_name("cuda_rates.json")


@functools.cache
def rates(path: Path = MEASURED_RATES) -> tuple[float, float, str]:
    """(tensor-core FLOP/s, CUDA-core FLOP/s, where they come from): measured ones when the GPU
    kit's results were turned into ``cuda_rates.json``, the datasheet's otherwise. Only their
    ratio decides; measured rates are achieved ones (launch and memory included)."""
    if path.exists():
        data = json.loads(path.read_text())
        source = f"rates measured on {data['device']} {data['date']}"
        return float(data["tensor_flops"]), float(data["cuda_core_flops"]), source
    return TENSOR_FLOPS, CUDA_CORE_FLOPS, "datasheet rates"


SMS = 132
MAX_SHARED_BYTES = 48 * 1024  # without the opt-in for more


def ceil_to(a: int, b: int) -> int:
    """``a`` rounded up to a multiple of ``b``."""
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
        return ceil_to(self.pack * self.kg, 16)

    @property
    def depth(self) -> int:  # Kp
        return ceil_to(self.pack * self.cg * self.taps, 16)

    @property
    def macs(self) -> int:
        """The conv's own multiply-adds (no padding)."""
        return self.groups * self.kg * self.cg * self.taps * self.pixels

    @property
    def waste(self) -> float:
        useful = self.kg * self.cg * self.taps * self.groups
        return self.rows * self.depth * (self.groups // self.pack) / useful

    @property
    def chosen(self) -> bool:
        return self.tile is not None and self.tensor_us < self.cuda_core_us

    def describe(self) -> str:
        verdict = "tensor cores" if self.chosen else "CUDA cores"
        if self.rows != self.pack * self.kg:
            return (f"CUDA cores: {self.groups} groups of {self.kg} output channels do not "
                    "pack into 16-row tensor-core tiles")  # fmt: skip
        if self.tile is None:
            return (f"CUDA cores: no tensor-core tile fills {SMS} SMs with the reduction in one "
                    f"shared stage ({self.groups // self.pack} GEMMs of {self.rows}x{self.depth} "
                    f"x {self.pixels} px)")  # fmt: skip
        return (f"{verdict}: {self.pack} group(s) per {self.rows}-row WMMA tile, "
                f"{self.waste:.1f}x padded work, estimate {self.tensor_us:.2f} us on tensor cores "
                f"vs {self.cuda_core_us:.2f} us on CUDA cores ({rates()[2]})")  # fmt: skip


def plan(groups: int, kg: int, cg: int, taps: int, pixels: int) -> TensorCorePlan:
    """How the conv would pack, and both estimates."""
    pack = 1
    while (pack * kg) % 16 and groups % (pack * 2) == 0 and pack * kg < 16:
        pack *= 2
    useful = 2.0 * groups * kg * cg * taps * pixels
    probe = TensorCorePlan(groups, pack, kg, cg, taps, pixels, 0.0, 0.0)
    tensor_flops, cuda_core_flops, _ = rates()
    tensor = useful * probe.waste / tensor_flops * 1e6
    # rows that are padding would leave output channels and GEMM rows apart: CUDA cores then
    exact = probe.rows == pack * kg
    tile = choose_tile(groups // pack, probe.rows, probe.depth, pixels) if exact else None
    return TensorCorePlan(groups, pack, kg, cg, taps, pixels, tensor,
                          useful / cuda_core_flops * 1e6, tile)  # fmt: skip


@dataclass(frozen=True)
class TensorCoreTile:
    warps_m: int  # warps along the rows (one 16-row fragment each)
    warps_p: int  # warps along the pixels
    frags_p: int  # 16-pixel fragments per warp
    stage: int  # 16-deep reduction fragments per shared-memory stage (per warp's slice)
    warps_k: int = 1  # warps that each sum a slice of the reduction (added in the epilogue)
    row_blocks: int = 1  # blocks along the rows (each 16 x warps_m of them)

    @property
    def pixels(self) -> int:
        return self.warps_p * self.frags_p * 16

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_p * self.warps_k

    def describe(self) -> str:
        split = f", reduction split over {self.warps_k} warps" if self.warps_k > 1 else ""
        rows = f"rows in {self.row_blocks} blocks, " if self.row_blocks > 1 else ""
        return (f"{self.threads} threads ({self.warps_m}x{self.warps_p}x{self.warps_k} warps), "
                f"{rows}{self.frags_p} accumulator tile(s) of 16x16 per warp, block tile "
                f"{16 * self.warps_m} rows x {self.pixels} px, "
                f"{16 * self.stage * self.warps_k} reduction per shared stage{split}")  # fmt: skip


def choose_tile(supers: int, rows: int, depth: int, pixels: int) -> TensorCoreTile | None:
    """The tile for the GEMM (``rows``/``depth``: its padded M and K; ``pixels``: N*OH*OW), or
    None when no tile passes issue #13's gates: >= 64 threads, a full wave of blocks on 132 SMs,
    the reduction in one shared stage (a staged loop carries the im2col copy's bounds checks
    into the MMA loop), every copy spread evenly over the threads. Among those: the most
    accumulator tiles per warp with at most 25% padded pixels, then the least padding, no
    split reduction, the widest pixel tile."""
    depth_frags = depth // 16
    best, best_key = None, None
    shapes = itertools.product(_divisors(rows // 16), (1, 2, 4, 8), (1, 2, 3, 4), (1, 2, 3, 4))
    for warps_m, warps_p, frags_p, warps_k in shapes:
        threads = 32 * warps_m * warps_p * warps_k
        tile_px, tile_rows = warps_p * frags_p * 16, 16 * warps_m
        # the whole reduction in one shared stage (a staged loop carries the im2col copy's
        # bounds checks into the MMA loop), each warp's float32 accumulators beside it
        shared = 2 * depth * (tile_rows + tile_px) + 4 * warps_k * tile_rows * tile_px
        if threads > 512 or shared > MAX_SHARED_BYTES or depth_frags % warps_k:
            continue
        row_blocks = rows // tile_rows
        tile = TensorCoreTile(warps_m, warps_p, frags_p, depth_frags // warps_k, warps_k,
                              row_blocks)  # fmt: skip
        blocks = supers * row_blocks * math.ceil(pixels / tile_px)
        # every copy and the epilogue spread evenly over the threads: a remainder would put
        # a barrier under a condition (TVM refuses to lower it)
        spread = (tile_rows * depth, depth * tile_px, tile_rows * tile_px)
        if threads < 64 or blocks < SMS or any(n % threads for n in spread):
            continue
        # at most 25% padded pixels, then the most accumulator tiles per warp (more MMAs per
        # fragment load), the least padding, no split reduction, the widest tile
        padded = ceil_to(pixels, tile_px) / pixels
        key = (padded > 1.25, -frags_p, round(padded, 1), warps_k, row_blocks, -tile_px)
        if best_key is None or key < best_key:
            best, best_key = tile, key
    return best


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
