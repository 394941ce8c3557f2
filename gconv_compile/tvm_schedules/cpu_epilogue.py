"""The llvm conv schedules' epilogue and padding: where the fused elementwise chain and the
zero padding run, and how their loops are vectorised (``cpu.schedule_conv``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tvm import s_tir

if TYPE_CHECKING:
    from ._conv import ConvInfo

logger = logging.getLogger(__name__)


def schedule_epilogue(sch: s_tir.Schedule, conv: ConvInfo, tile, epilogue, anchor) -> str:
    """Compute the epilogue per tile (``tile``: the conv's ``cpu.CpuTile``), right after its
    accumulators, and vectorise its stores.

    Returns what the decision line adds: how a channel-form epilogue runs, else ''."""
    sch.reverse_compute_at(epilogue, anchor, preserve_unit_loops=True)
    e_all = sch.get_loops(epilogue)
    at = next(i for i, lp in enumerate(e_all) if sch.get(lp).same_as(sch.get(anchor)))
    e_loops = e_all[at + 1 :]
    if conv.is_pointwise:
        _, e_f, e_px = e_loops
    else:
        _, e_f, e_y, e_x = e_loops
        e_px = sch.fuse(e_y, e_x) if tile.form == "pixel" else None
    if tile.form == "pixel":
        e_r, e_v = sch.split(e_px, [None, tile.vector])
        sch.unroll(e_f)
        sch.unroll(e_r)
        sch.vectorize(e_v)
        return ""
    spatial = [e_px] if conv.is_pointwise else [e_y, e_x]
    if _reads_a_feature_map(sch, epilogue):
        # a residual operand read along channels would be a gather: the old scalar epilogue
        for loop in [e_f, *spatial]:
            sch.unroll(loop)
        return "; epilogue per element (residual operand)"
    _channel_vector_epilogue(sch, tile, e_f, spatial)
    return "; epilogue on channel vectors"


def _channel_vector_epilogue(sch: s_tir.Schedule, tile, e_f, spatial: list) -> None:
    """The epilogue's arithmetic on the accumulators' own channel vectors; only the NCHW
    stores are per lane (LLVM scalarises a strided vector store).

    Unrolled scalar code made LLVM's SLP vectoriser gather each pixel run from the spilled
    accumulators with one insert per element. Alone, 2 threads, AVX-512 EPYC
    (``benchmarks/cpu_functions.py``): MobileNetV2's 3->32 stem 106 -> 69 us, its 1x1 convs
    on 7x7 and 14x14 0.91-1.0x; with a residual operand (a gather along channels) 0.85-1.06x,
    so those keep the scalar epilogue.
    """
    f_o, f_v = sch.split(e_f, [None, tile.vector])
    sch.reorder(f_o, *spatial, f_v)
    for loop in [f_o, *spatial]:
        sch.unroll(loop)
    sch.vectorize(f_v)


def _reads_a_feature_map(sch: s_tir.Schedule, epilogue) -> bool:
    """Whether the epilogue reads a tensor with more than one element per channel besides its
    accumulator (a residual add), as opposed to per-channel constants and scalars."""
    for region in sch.get(epilogue).reads:
        buffer = region.source
        if buffer.scope() == "local" or len(buffer.shape) < 3:
            continue
        spatial = 1
        for dim in buffer.shape[2:]:
            spatial = spatial * int(dim) if hasattr(dim, "value") else 2
        if spatial > 1:
            return True
    return False


def schedule_pad(sch: s_tir.Schedule, pad, task) -> None:
    """Pad inside each parallel task (only the channels and rows it reads, hot in cache).

    One conditional pass, not ``decompose_padding``'s zero fill of the whole panel plus a copy:
    the fill writes every element twice, which cost strided convs (whose panels are 4x their
    output) 2-7% of their time on an AVX-512 Zen 4, and stride-1 convs nothing measurable (and
    depthwise convs on the AVX-512 EPYC of issue #14, one thread: 6-120% slower on each of
    MobileNetV2's depthwise shapes tried).
    """
    try:
        sch.compute_at(pad, task, preserve_unit_loops=True)
    except Exception:  # noqa: BLE001 - keep the plain pad at the root: slower, still correct
        logger.debug("pad not moved into the conv tasks", exc_info=True)
        loops = sch.get_loops(pad)
        if not any(sch.get(lp).same_as(sch.get(task)) for lp in loops):
            sch.parallel(sch.fuse(*loops[:2]))
