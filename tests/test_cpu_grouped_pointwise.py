"""CPU conv schedules: a grouped 1x1 conv's pixel tile may straddle two groups.

ShuffleNet v1's grouped 1x1 convs have 34, 68 or 136 channels per group, so tiles of whole
groups had at most 2 channels (34 = 2 x 17) and 14 accumulators. A tile of 4 channels that
crosses a group boundary loads one more pixel vector there and is otherwise the same code; with
AVX-512 it takes 4 x 7 accumulators (as the long 1x1 convs on 7x7 do): 136->136 g4 on 28x28
30.9 -> 21.3 us alone, 0.66-0.71x in the model, ShuffleNet v1 0.934x (two builds in one process,
2 threads, AVX-512 EPYC). AVX2 keeps its tiles.
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


@pytest.mark.parametrize(
    ("channels", "groups", "size", "lanes", "registers", "expected"),
    [(136, 4, 28, 16, 32, "pixel form: 16-wide vectors along pixels, 28 accumulators (4 ch x 1 row x 7 col)"),
     (136, 4, 28, 8, 16, "pixel form: 8-wide vectors along pixels, 7 accumulators (1 ch x 1 row x 7 col)"),
     (136, 1, 28, 16, 32, "pixel form: 16-wide vectors along pixels, 14 accumulators (2 ch x 1 row x 7 col)")],
    ids=["136g4@28-avx512-straddles", "136g4@28-avx2-unchanged", "dense-unchanged"],
)  # fmt: skip
def test_grouped_pointwise_tile_may_straddle_groups(
    channels, groups, size, lanes, registers, expected
):
    conv = dataclasses.replace(
        dense_conv(channels, channels, size), in_per_group=channels // groups
    )
    tile = cpu.choose_tile(conv, lanes, registers, can_pack=True)
    assert tile.describe().startswith(expected), tile.describe()


def test_group_straddling_tile_matches_onnxruntime():
    model = conv_model(136, 136, (28, 28), group=4, kernel=(1, 1), pads=(0, 0, 0, 0), seed=81)
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    if "16 lanes" in conv.detail:
        assert "28 accumulators (4 ch x 1 row x 7 col)" in conv.detail, conv.line()
    out, ref = run_both(model, random_feeds(model, seed=82), vm)
    assert_close(out, ref, F32)
