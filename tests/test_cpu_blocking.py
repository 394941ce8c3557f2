"""CPU conv schedules: how a dense conv's output pixels are blocked for the caches.

Each block re-reads every weight of the conv and each output-channel tile re-reads the block's
input panel, so a conv whose weights outweigh its input (ResNeXt-50's 1x1 convs on 7x7 and 14x14
maps) wants few blocks, and one whose input outweighs its weights (56x56 maps) wants panels that
stay in L2. Before, every conv was blocked for its input alone: the 2048->1024 conv on 7x7 got
one block per 7-pixel tile and read its 8 MB of weights 7 times per run.
"""

from __future__ import annotations

import pytest
from test_schedules import (
    F32,
    assert_close,
    compile_cpu,
    conv_decisions,
    conv_model,
    random_feeds,
    run_both,
)

tvm = pytest.importorskip("tvm")

from gconv_compile.tvm_schedules import cpu  # noqa: E402
from gconv_compile.tvm_schedules._conv import ConvInfo  # noqa: E402


def dense_conv(c_in: int, c_out: int, size: int, *, kernel: int = 1, stride: int = 1) -> ConvInfo:
    """A dense conv as ``find_conv`` describes it (no schedule behind it: ``choose_tile`` only)."""
    return ConvInfo(
        block=None, batch=1, in_channels=c_in, out_channels=c_out, in_per_group=c_in,
        out_h=size, out_w=size, kernel=(kernel, kernel), stride=(stride, stride),
        dilation=(1, 1), dtype="float32", input_is_padded=kernel > 1, pad_block=None,
        weight_param="w", weight_is_param=True,
    )  # fmt: skip


def blocks_and_tasks(conv: ConvInfo, lanes: int, registers: int) -> tuple[int, int]:
    tile = cpu.choose_tile(conv, lanes, registers, can_pack=True)
    units = (
        (conv.out_h * conv.out_w // tile.pixels) if conv.is_pointwise else conv.out_h // tile.y_reg
    )
    f_tile = tile.f_reg * (tile.vector if tile.form == "channel" else 1)
    blocks = units // tile.block
    return blocks, blocks * (conv.out_channels // f_tile)


@pytest.mark.parametrize(
    ("conv", "blocks"),
    [(dense_conv(2048, 1024, 7), 1), (dense_conv(1024, 2048, 7, stride=2), 1),
     (dense_conv(1024, 2048, 7), 1)],
    ids=["2048-1024-7x7", "1024-2048-stride2-7x7", "1024-2048-7x7"],
)  # fmt: skip
def test_weight_heavy_dense_conv_reads_its_weights_once(conv, blocks):
    """AVX-512 (16 lanes, 32 registers): the whole 7x7 map's input panel (200-400 KB) fits the
    L2 share of these cores, so one block. (AVX2 keeps 256 KB panels: with 8-channel tiles,
    re-reading a panel that does not fit from L3 128 times costs more bytes.)"""
    assert blocks_and_tasks(conv, 16, 32)[0] == blocks


@pytest.mark.parametrize(("lanes", "registers"), [(16, 32), (8, 16)], ids=["avx512", "avx2"])
@pytest.mark.parametrize(
    "conv",
    [dense_conv(3, 64, 112, kernel=7, stride=2), dense_conv(64, 256, 56), dense_conv(128, 256, 56)],
    ids=["stem-7x7-stride2", "64-256-56x56", "128-256-56x56"],
)
def test_input_heavy_dense_conv_keeps_blocks_and_parallel_tasks(conv, lanes, registers):
    """The stem's weights are tiny: fewest bytes alone would make one task of the whole image
    (it ran 2x slower); 56x56 maps keep panels that fit L2, several per conv."""
    blocks, tasks = blocks_and_tasks(conv, lanes, registers)
    assert tasks >= cpu.MIN_TASKS
    assert blocks > 1


def test_whole_map_block_matches_onnxruntime():
    """2048 -> 512 on 7x7: its 4 MB of weights outweigh the 400 KB input, so the AVX-512 build
    runs every pixel of the map in one block (the panel fits 512 KB); before, one block per
    tile. Either way the numbers must be onnxruntime's."""
    model = conv_model(2048, 512, (7, 7), kernel=(1, 1), pads=(0, 0, 0, 0), seed=5)
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    assert conv.schedule == "cpu-dense-conv", conv.line()
    out, ref = run_both(model, random_feeds(model, seed=6), vm)
    assert_close(out, ref, F32)
