"""Tile choice for the CUDA grouped and depthwise conv schedules: exact tiles, scored statically.

A tile is a block of ``f_tile`` output channels x ``rows`` output rows x ``cols`` output columns
and a register tile of ``f_t`` channels x ``x_t`` adjacent columns per thread. Every extent
divides the output (channels per group or whole groups, rows, columns), so no thread ever
computes outside it and the generated code has no bounds check anywhere near the FMAs. A block
either stays inside one group (``f_tile`` divides the channels per group) or holds whole groups
(``f_tile`` = G x channels per group); then the input tile holds all their input channels.

Every candidate is scored by the same static model as ``cuda_static`` (issue slots and shared
memory bytes of the busiest SM, per FMA of a thread's register tile, plus the cooperative loads)
after the gates of issue #13: threads a multiple of 32 and >= 64, at least one block per SM,
<= 0.5 shared loads per FMA. Candidates that break fewer gates win; among equals, the lowest
estimated time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._conv import ConvInfo

SMS = 132  # H200; the score only needs a wave size of the right order
MAX_THREADS = 512
MAX_SHARED_BYTES = 40 * 1024
MAX_ACCUMULATORS = 32


@dataclass(frozen=True)
class CudaTile:
    f_tile: int  # output channels per block (divides the channels per group, or whole groups)
    f_t: int  # output channels per thread
    rows: int  # output rows per block (one per thread row)
    cols: int  # output columns per block
    x_t: int  # adjacent output columns per thread
    rc_i: int  # input channels per shared-memory stage
    k_split: int = 1  # threads that share an output, each summing a slice of the input channels

    @property
    def threads(self) -> int:
        return (self.f_tile // self.f_t) * self.rows * (self.cols // self.x_t) * self.k_split

    @property
    def outputs_per_thread(self) -> int:
        return self.f_t * self.x_t

    def describe(self) -> str:
        return (
            f"{self.threads} threads, {self.outputs_per_thread} outputs/thread "
            f"({self.f_t} ch x {self.x_t} px), block tile {self.f_tile} ch x {self.rows} x "
            f"{self.cols} px, {self.rc_i} input ch per shared stage"
            + (f", reduction split over {self.k_split} threads" if self.k_split > 1 else "")
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _shared_loads(conv: ConvInfo, tile: CudaTile) -> tuple[int, int, int]:
    """(shared loads, their bytes, FMAs) of one thread per input channel and kernel row."""
    kw = conv.kernel[1]
    sw, dw = conv.stride[1], conv.dilation[1]
    element = 2 if conv.dtype == "float16" else 4
    inputs = len({i * sw + k * dw for i in range(tile.x_t) for k in range(kw)})
    # a thread's channels are adjacent in the weight tile: 16-byte loads where they fill one
    vector = 16 // element
    weights = kw * math.ceil(tile.f_t / vector)
    weight_bytes = kw * tile.f_t * element
    return inputs + weights, inputs * element + weight_bytes, kw * tile.f_t * tile.x_t


def _shared_bytes(conv: ConvInfo, tile: CudaTile) -> tuple[int, int, int]:
    """(input tile, weight tile, partial sums) elements in shared memory."""
    kh, kw = conv.kernel
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    channels = tile.rc_i * max(1, tile.f_tile // conv.out_per_group)
    in_rows = (tile.rows - 1) * sh + (kh - 1) * dh + 1
    in_cols = (tile.cols - 1) * sw + (kw - 1) * dw + 1
    partials = tile.k_split * tile.f_tile * tile.rows * tile.cols if tile.k_split > 1 else 0
    return channels * in_rows * in_cols, tile.f_tile * tile.rc_i * kh * kw, partials


def fmas_per_thread(conv: ConvInfo, tile: CudaTile) -> int:
    """FMAs one thread does: its register tile times its share of the reduction."""
    reduction = conv.in_per_group * conv.kernel[0] * conv.kernel[1] // tile.k_split
    return tile.outputs_per_thread * reduction


def score(conv: ConvInfo, tile: CudaTile) -> tuple[int, float]:
    """(gates broken, estimated busiest-SM cycles) of a tile; lower is better."""
    loads, load_bytes, fmas = _shared_loads(conv, tile)
    blocks = conv.out_channels // tile.f_tile * (conv.out_h // tile.rows)
    blocks *= conv.out_w // tile.cols
    broken = (tile.threads % 32 != 0) + (tile.threads < 64) + (blocks < SMS)
    broken += conv.kind == "grouped" and loads / fmas > 0.5
    in_elems, w_elems, partials = _shared_bytes(conv, tile)
    per_thread_fma = fmas_per_thread(conv, tile)
    stages = conv.in_per_group // tile.rc_i
    copy = 4 * (in_elems + w_elems) * stages / tile.threads  # load, store, address, predicate
    summing = 3 * partials / tile.threads  # store a partial, load it back, add
    instructions = per_thread_fma * (1 + loads / fmas + 0.15) + copy + summing
    warps = math.ceil(tile.threads / 32) * math.ceil(blocks / SMS)
    issue = warps * instructions / 4
    shared = warps * 32 * per_thread_fma * (load_bytes / fmas) / 128
    barriers = stages + (tile.k_split > 1)
    return broken, max(issue, shared) + 300 * barriers * math.ceil(blocks / SMS)


def _candidates(conv: ConvInfo):
    kg, cg = conv.out_per_group, conv.in_per_group
    f_tiles = sorted(set(_divisors(kg)) | {kg * g for g in _divisors(conv.groups)})
    for f_tile in f_tiles:
        for f_t in (d for d in _divisors(min(f_tile, kg)) if d <= 8 and f_tile % d == 0):
            for x_t in (d for d in _divisors(conv.out_w) if d <= 8 or d == conv.out_w <= 16):
                if f_t * x_t > MAX_ACCUMULATORS:
                    continue
                for cols in (c for c in _divisors(conv.out_w) if c % x_t == 0):
                    for rows in _divisors(conv.out_h):
                        tile = CudaTile(f_tile, f_t, rows, cols, x_t, cg)
                        if tile.threads > MAX_THREADS:
                            break  # more rows only add threads
                        yield from _with_stages(conv, tile)


def _with_stages(conv: ConvInfo, tile: CudaTile):
    """The tile with its shared stages: all input channels at once, split over k_split
    threads, or (a block inside one group, no split) the fewest stages that fit."""
    element = 2 if conv.dtype == "float16" else 4
    cg = conv.in_per_group

    def fits(t: CudaTile) -> bool:
        return t.threads <= MAX_THREADS and sum(_shared_bytes(conv, t)) * element <= (
            MAX_SHARED_BYTES
        )

    for k_split in (d for d in _divisors(cg) if d <= 32):
        split = CudaTile(tile.f_tile, tile.f_t, tile.rows, tile.cols, tile.x_t, cg, k_split)
        if split.threads > MAX_THREADS:
            break
        if fits(split):
            yield split
    if tile.f_tile > conv.out_per_group:
        return
    for rc_i in _divisors(cg)[::-1][1:]:
        staged = CudaTile(tile.f_tile, tile.f_t, tile.rows, tile.cols, tile.x_t, rc_i)
        if fits(staged):
            yield staged
            return


def choose_tile(conv: ConvInfo) -> CudaTile:
    """The best exact tile for ``conv`` (see the module docstring)."""
    return min(_candidates(conv), key=lambda t: score(conv, t))
