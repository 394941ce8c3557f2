"""CPU conv schedules: a channel-form conv's epilogue runs on the accumulators' channel vectors.

The epilogue (bias, clip, batch norm folded or not) used to run per element, fully unrolled,
and LLVM's SLP vectoriser gathered each run of pixels from the spilled accumulators one insert
at a time. On channel vectors only the NCHW stores are per lane: MobileNetV2 0.965x in the
model (``benchmarks/model_ab.py``, one process, 2 threads, AVX-512 EPYC), its 3->32 stem
106 -> 69 us alone. An epilogue with a residual operand keeps the per-element form (that
operand, read along channels, would be a gather). Each case against onnxruntime.
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

pytest.importorskip("tvm")

CASES = [
    ("stem-3x3-s2", dict(c_in=3, c_out=32, size=(18, 18), stride=2), "relu"),
    ("pointwise-7x7-bn", dict(c_in=48, c_out=64, size=(7, 7), kernel=(1, 1), pads=(0,) * 4), "bn"),
    ("grouped-1x1", dict(c_in=64, c_out=64, size=(7, 7), kernel=(1, 1), pads=(0,) * 4, group=4), "relu"),
    ("odd-size-3x3", dict(c_in=8, c_out=48, size=(9, 11)), "relu"),
]  # fmt: skip


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
@pytest.mark.parametrize(("kwargs", "epilogue"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_channel_form_epilogue_runs_on_channel_vectors(kwargs, epilogue, mcpu):
    model = conv_model(epilogue=epilogue, seed=41, **kwargs)
    vm, decisions = compile_cpu(model, form="channel", mcpu=mcpu)
    (conv,) = conv_decisions(decisions)
    assert "channel form" in conv.detail and "epilogue on channel vectors" in conv.detail, (
        conv.line()
    )
    out, ref = run_both(model, random_feeds(model, seed=42), vm)
    assert_close(out, ref, F32)


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
def test_residual_epilogue_stays_per_element(mcpu):
    model = conv_model(32, 32, (7, 7), kernel=(1, 1), pads=(0,) * 4, epilogue="residual", seed=43)
    vm, decisions = compile_cpu(model, form="channel", mcpu=mcpu)
    (conv,) = conv_decisions(decisions)
    assert "epilogue per element (residual operand)" in conv.detail, conv.line()
    out, ref = run_both(model, random_feeds(model, seed=44), vm)
    assert_close(out, ref, F32)


def test_pixel_form_epilogue_is_unchanged():
    model = conv_model(16, 8, (8, 16), kernel=(1, 1), pads=(0,) * 4, seed=45)
    vm, decisions = compile_cpu(model, form="pixel")
    (conv,) = conv_decisions(decisions)
    assert "pixel form" in conv.detail and "epilogue" not in conv.detail, conv.line()
    out, ref = run_both(model, random_feeds(model, seed=46), vm)
    assert_close(out, ref, F32)
