"""CPU conv schedules: stride-2 depthwise convs whose pixel vectors would gather.

TVM vectorises ``in[2x + rx]`` lane by lane; left as a loop, LLVM's vectoriser loads whole
vectors and deinterleaves them (MobileNetV2's 96@112 stride-2 conv: 176 -> 90 us, 2 threads,
AVX-512). Short rows (<= 8 outputs) keep the even/odd input split; AVX2 keeps TVM's vectors on
rows under 28 outputs (LLVM's were 7% slower on 14).
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

LLVM = "left to LLVM's vectoriser"


@pytest.mark.parametrize(
    ("size", "mcpu", "expected"),
    [((112, 112), None, True), ((56, 56), None, True), ((28, 28), "skylake-avx512", True),
     ((28, 28), "haswell", False), ((56, 56), "haswell", True), ((14, 14), None, False),
     ((57, 57), None, False)],
    ids=["112-host", "56-host", "28-avx512", "28-avx2", "56-avx2", "14-split", "57-prime-rows-scalar"],
)  # fmt: skip
def test_stride2_depthwise_rows_left_to_llvm_match_onnxruntime(size, mcpu, expected):
    from gconv_compile.targets import cpu_flags

    needs = {"avx512f"} if mcpu == "skylake-avx512" else {"avx2", "fma"} if mcpu else set()
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU cannot run {mcpu} code")
    model = conv_model(16, 16, size, group=16, stride=2, seed=51)
    vm, decisions = compile_cpu(model, mcpu=mcpu)
    (conv,) = conv_decisions(decisions)
    assert conv.schedule == "cpu-depthwise-conv", conv.line()
    if "16 lanes" in conv.detail or mcpu == "haswell" or expected is False:
        assert (LLVM in conv.detail) == expected, conv.detail
    out, ref = run_both(model, random_feeds(model, seed=52), vm)
    assert_close(out, ref, F32)
