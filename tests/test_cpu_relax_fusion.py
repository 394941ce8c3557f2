"""CPU builds: a residual ``Sum`` and ``Relu`` after a conv's batch norm land in the conv.

The ONNX importer writes ``BatchNormalization`` as ``batch_norm(...)[0]``, which decomposes
for inference into ``Tuple(y, mean, var)[0]``. FuseOps ended the conv's group at the tuple, so
ShuffleNet v1's residual adds and Relus ran as functions of their own, one more pass over
memory each (13 of them; 2.20 -> 1.86 ms for the model once they fused).
"""

from __future__ import annotations

import numpy as np
import pytest
from builders import init, make_model, rng, tensor_info
from onnx import helper
from test_schedules import F32, assert_close, compile_cpu, conv_decisions, random_feeds, run_both

pytest.importorskip("tvm")


def conv_bn_sum_relu(channels: int = 16, size: int = 6, group: int = 4):
    """X -> Conv(1x1, group) -> BatchNormalization -> Sum(., X) -> Relu."""
    r = rng(21)
    c = channels
    inits = [
        init("W", r.standard_normal((c, c // group, 1, 1)).astype(np.float32)),
        init("scale", r.uniform(0.5, 1.5, c).astype(np.float32)),
        init("shift", r.standard_normal(c).astype(np.float32)),
        init("mean", r.standard_normal(c).astype(np.float32)),
        init("var", r.uniform(0.5, 2.0, c).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["C"], group=group, kernel_shape=[1, 1]),
        helper.make_node("BatchNormalization", ["C", "scale", "shift", "mean", "var"], ["B"]),
        helper.make_node("Sum", ["B", "X"], ["S"]),
        helper.make_node("Relu", ["S"], ["Y"]),
    ]
    shape = [1, c, size, size]
    outputs = [helper.make_tensor_value_info("Y", F32, shape)]
    return make_model(nodes, [tensor_info("X", shape)], outputs, inits)


def test_residual_sum_and_relu_after_batch_norm_fuse_into_the_conv():
    model = conv_bn_sum_relu()
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    others = [d.line() for d in decisions if d is not conv]
    assert conv.function.endswith("_relu"), conv.function
    # the batch norm folded into the weights (its bias add), then the residual add
    assert conv.function.count("add") == 2, conv.function
    assert not any("add" in line or "relu" in line for line in others), others
    out, ref = run_both(model, random_feeds(model, seed=22), vm)
    assert_close(out, ref, F32)
