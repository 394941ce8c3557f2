"""CPU fallback schedule (``tvm_schedules.cpu_fallback``): plane copies with short rows.

ShuffleNet v1's channel shuffle (Reshape -> Transpose -> Reshape) copies whole channel planes in
a new order. On 14x14 and 7x7 maps, one loop per 14- or 7-float row left a short vector and a
scalar tail per row (15 us alone for 272 channels on 14x14, 2.1 us as one loop per plane).
"""

from __future__ import annotations

import numpy as np
import pytest
from builders import init, make_model, tensor_info
from onnx import helper
from test_schedules import F32, assert_close, compile_cpu, random_feeds, run_both

pytest.importorskip("tvm")


def channel_shuffle(channels: int, size: int, groups: int = 4):
    shape = [1, channels, size, size]
    split = [1, groups, channels // groups, size, size]
    nodes = [
        helper.make_node("Reshape", ["X", "split"], ["G"]),
        helper.make_node("Transpose", ["G"], ["T"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["T", "shape"], ["Y"]),
    ]
    inits = [init("split", np.array(split, np.int64)), init("shape", np.array(shape, np.int64))]
    outputs = [helper.make_tensor_value_info("Y", F32, shape)]
    return make_model(nodes, [tensor_info("X", shape)], outputs, inits)


@pytest.mark.parametrize(("size", "fused"), [(14, True), (7, True), (40, False)])
def test_channel_shuffle_copies_planes_with_short_rows_in_one_loop(size, fused):
    """Rows of 40 floats vectorise on their own and keep the row loop."""
    model = channel_shuffle(24, size)
    vm, decisions = compile_cpu(model)
    (shuffle,) = [d for d in decisions if "transpose" in d.function]
    assert shuffle.schedule == "llvm-fallback", shuffle.line()
    assert ("rows fused into planes" in shuffle.detail) == fused, shuffle.line()
    out, ref = run_both(model, random_feeds(model, seed=31), vm)
    assert_close(out, ref, F32)
    np.testing.assert_array_equal(out, ref)  # a copy: bit for bit
