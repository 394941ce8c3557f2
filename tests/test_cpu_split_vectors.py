"""CPU conv schedules: a 14-wide pixel vector costs three loads when the tile is chosen.

LLVM loads a 14-wide vector as 8 + 4 + 2 lanes and inserts them; counted as one load, ShuffleNet
v1's grouped 1x1 convs on 14x14 (68 channels per group) took 2 channels x 7 vectors, sharing each
expensive pixel load between 2 channels. Counted as three they take 4 x 2: alone 37 -> 25 us,
in the model (two builds in one process, 2 threads, AVX-512 EPYC) 0.84-0.86x per function and
ShuffleNet v1 0.92x. AVX-512 only; AVX2 tiles (measured nowhere) keep their old choice. Since
tiles may straddle groups (``test_cpu_grouped_pointwise``), 8 x 2 (22.9 us alone).
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


def grouped_pointwise(channels: int, groups: int, size: int):
    conv = dense_conv(channels, channels, size)
    return dataclasses.replace(conv, in_per_group=channels // groups)


@pytest.mark.parametrize(
    ("channels", "size", "lanes", "registers", "expected"),
    [(272, 14, 16, 32, "pixel form: 14-wide vectors along pixels, 16 accumulators (8 ch x 1 row x 2 col)"),
     (240, 14, 16, 32, "pixel form: 14-wide vectors along pixels, 16 accumulators (8 ch x 1 row x 2 col)"),
     (272, 14, 8, 16, "channel form: 4-wide vectors along output channels, 7 accumulators (1 ch x 1 row x 7 col)")],
    ids=["272g4@14-avx512", "240g4@14-avx512", "272g4@14-avx2-unchanged"],
)  # fmt: skip
def test_split_pixel_vectors_share_each_load_among_more_channels(
    channels, size, lanes, registers, expected
):
    tile = cpu.choose_tile(grouped_pointwise(channels, 4, size), lanes, registers, can_pack=True)
    assert tile.describe().startswith(expected), tile.describe()


def test_four_channel_split_vector_tile_matches_onnxruntime():
    model = conv_model(136, 136, (14, 14), group=2, kernel=(1, 1), pads=(0, 0, 0, 0), seed=71)
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    if "16 lanes" in conv.detail:
        assert "14-wide vectors along pixels, 16 accumulators (8 ch x 1 row x 2 col)" in conv.detail
    out, ref = run_both(model, random_feeds(model, seed=72), vm)
    assert_close(out, ref, F32)
