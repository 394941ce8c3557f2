"""CPU conv schedules: which form a 1x1 conv takes when both fill the vector registers.

Both forms of MobileNetV2's 192->32 1x1 conv on 28x28 fill 16 lanes with 14 accumulators
(2 x 7) and load 9 operands per 14 FMAs; the pixel form, picked first on the tie, ran 1.75x the
channel form's time in the model. With 32 input channels (its 32->192 conv) the pixel form was
the faster one (1.2x), so the tie goes to the channel form from 64 input channels.
"""

from __future__ import annotations

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
    ("c_in", "c_out", "form"),
    [(192, 32, "channel"), (144, 32, "channel"), (32, 192, "pixel"), (16, 96, "pixel")],
    ids=["192-32", "144-32", "32-192", "16-96"],
)
def test_long_pointwise_reduction_breaks_the_tie_to_the_channel_form(c_in, c_out, form):
    tile = cpu.choose_tile(dense_conv(c_in, c_out, 28), 16, 32, can_pack=True)
    assert tile.form == form, tile.describe()


def test_channel_form_pointwise_conv_matches_onnxruntime():
    model = conv_model(192, 32, (28, 28), kernel=(1, 1), pads=(0, 0, 0, 0), seed=41)
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    lanes = 16 if "16 lanes" in conv.detail else 8
    if lanes == 16:  # an AVX-512 machine builds the tie case
        assert "channel form" in conv.detail, conv.line()
    out, ref = run_both(model, random_feeds(model, seed=42), vm)
    assert_close(out, ref, F32)


@pytest.mark.parametrize(
    ("c_in", "c_out", "accumulators"),
    [(2048, 1024, 28), (320, 1280, 28), (160, 960, 21), (1024, 2048, 28)],
    ids=["2048-1024", "320-1280", "160-960-short", "1024-2048"],
)
def test_long_1x1_reduction_on_7x7_takes_4_x_7_accumulators(c_in, c_out, accumulators):
    """AVX-512: 4 channel vectors x 7 pixels use all 32 registers (broadcasts from memory)."""
    tile = cpu.choose_tile(dense_conv(c_in, c_out, 7), 16, 32, can_pack=True)
    assert tile.form == "channel" and tile.f_reg * tile.x_reg == accumulators, tile.describe()
    avx2 = cpu.choose_tile(dense_conv(c_in, c_out, 7), 8, 16, can_pack=True)
    assert avx2.f_reg * avx2.y_reg * avx2.x_reg <= 12, avx2.describe()


def test_4_x_7_tile_matches_onnxruntime():
    model = conv_model(256, 64, (7, 7), kernel=(1, 1), pads=(0, 0, 0, 0), seed=43)
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    if "16 lanes" in conv.detail:
        assert "28 accumulators (4 ch x 1 row x 7 col)" in conv.detail, conv.line()
    out, ref = run_both(model, random_feeds(model, seed=44), vm)
    assert_close(out, ref, F32)
