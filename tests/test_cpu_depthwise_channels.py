"""CPU conv schedules: two channels per tile for stride-1 depthwise convs on small maps.

A depthwise conv's tile grows along rows only (each channel has its own input), so on 7x7 and
14x14 maps it held 7 accumulators (7 rows x 1 vector) out of 26. Two channels per tile: in the
models (two builds in one process, 2 threads, AVX-512 EPYC), MobileNetV2 0.988x and ShuffleNet
v1 0.987x; per function 0.89-0.96x on the 7x7 and 14x14 depthwise convs. AVX2's 12 accumulators
do not fit two 7-row tiles, so its tiles stay as they were.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_cpu_blocking import dense_conv
from test_schedules import (
    F32,
    assert_close,
    compile_cpu,
    conv_decisions,
    conv_model,
    random_feeds,
    run_both,
)

pytest.importorskip("tvm")

from gconv_compile.tvm_schedules import cpu  # noqa: E402


def depthwise_conv(channels: int, size: int, *, stride: int = 1):
    conv = dense_conv(channels, channels, size, kernel=3, stride=stride)
    return dataclasses.replace(conv, in_per_group=1)


@pytest.mark.parametrize(
    ("channels", "size", "stride", "lanes", "registers", "channels_per_tile"),
    [(960, 7, 1, 16, 32, 2), (384, 14, 1, 16, 32, 2), (544, 7, 1, 16, 32, 2),
     (32, 112, 1, 16, 32, 1), (960, 7, 1, 8, 16, 1), (576, 14, 2, 16, 32, 1),
     (15, 7, 1, 16, 32, 1)],
    ids=["960@7-avx512", "384@14-avx512", "544@7-avx512", "32@112-rows-fill-registers",
         "960@7-avx2-no-room", "576@14-stride2", "odd-channel-count"],
)  # fmt: skip
def test_stride1_depthwise_on_small_maps_takes_two_channels(
    channels, size, stride, lanes, registers, channels_per_tile
):
    tile = cpu.choose_tile(depthwise_conv(channels, size, stride=stride), lanes, registers,
                           can_pack=True)  # fmt: skip
    assert tile.form == "pixel" and tile.f_reg == channels_per_tile, tile.describe()
    budget = registers - (4 if registers <= 16 else 6)  # choose_tile's accumulator budget
    assert tile.f_reg * tile.y_reg * tile.x_reg <= budget, tile.describe()


@pytest.mark.parametrize("size", [(7, 7), (14, 14)], ids=["7x7", "14x14"])
def test_two_channel_depthwise_tile_matches_onnxruntime(size):
    model = conv_model(24, 24, size, group=24, seed=61)
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    assert conv.schedule == "cpu-depthwise-conv", conv.line()
    if "16 lanes" in conv.detail:
        assert "(2 ch x 7 row x 1 col)" in conv.detail, conv.line()
    out, ref = run_both(model, random_feeds(model, seed=62), vm)
    assert_close(out, ref, F32)
