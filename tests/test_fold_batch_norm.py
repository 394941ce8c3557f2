"""Batch norm after a conv with constant weights is folded into them (``fold_batch_norm``).

The conv's epilogue then adds a bias instead of doing four operations per output element
(ShuffleNet v1, a batch norm after every conv: 0.96x the time). Every case runs against
onnxruntime (CPU EP, no graph optimisations) on seeded random inputs; a batch norm that must
not be folded keeps its arithmetic in the epilogue and stays correct.
"""

from __future__ import annotations

import numpy as np
import pytest
from builders import init, make_model, rng, tensor_info
from onnx import helper, numpy_helper
from test_schedules import (
    F16,
    F32,
    assert_close,
    compile_cpu,
    conv_decisions,
    conv_model,
    random_feeds,
    run_both,
)

pytest.importorskip("tvm")

BN_OPS = ("subtract", "multiply")


def _bn_in_epilogue(decisions) -> list[str]:
    return [d.function for d in conv_decisions(decisions) if any(op in d.function for op in BN_OPS)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(c_in=8, c_out=16, size=(9, 7), bias=False),
        dict(c_in=8, c_out=16, size=(9, 7), bias=True, stride=2),
        dict(c_in=16, c_out=32, size=(8, 8), group=4, bias=False),
        dict(c_in=16, c_out=16, size=(10, 10), group=16, bias=True),
        dict(c_in=32, c_out=24, size=(7, 7), kernel=(1, 1), pads=(0,) * 4, bias=False),
        dict(c_in=8, c_out=8, size=(6, 6), bias=False, repeat=3),
    ],
    ids=["dense", "dense-bias-s2", "grouped", "depthwise-bias", "pointwise", "chain-of-3"],
)
def test_batch_norm_folds_into_the_conv(kwargs):
    model = conv_model(epilogue="bn", seed=5, **kwargs)
    vm, decisions = compile_cpu(model)
    convs = conv_decisions(decisions)  # a chain's same-shape convs share one function
    assert convs
    assert not _bn_in_epilogue(decisions), [d.line() for d in convs]
    assert all("add" in d.function for d in convs), [d.function for d in convs]
    out, ref = run_both(model, random_feeds(model, seed=6), vm)
    assert_close(out, ref, F32)


def test_float16_folds_in_float64_and_rounds_once():
    model = conv_model(16, 16, (8, 8), group=4, epilogue="bn", dtype=F16, seed=7)
    vm, decisions = compile_cpu(model)
    assert not _bn_in_epilogue(decisions)
    out, ref = run_both(model, random_feeds(model, seed=8), vm)
    assert_close(out, ref, F16)


def test_weights_passed_as_inputs_keep_the_batch_norm_in_the_epilogue():
    model = conv_model(16, 16, (8, 8), group=4, epilogue="bn", weight_as_input=True)
    vm, decisions = compile_cpu(model)
    assert _bn_in_epilogue(decisions), [d.line() for d in decisions]
    out, ref = run_both(model, random_feeds(model, seed=9), vm)
    assert_close(out, ref, F32)


def conv_bn_and_raw_output(c: int = 8, size: int = 6):
    """X -> Conv -> (BatchNormalization -> Y, and the raw conv -> Z + Y): the conv has two
    users, so folding would compute it twice; the batch norm stays."""
    r = rng(31)
    inits = [
        init("W", r.standard_normal((c, c, 3, 3)).astype(np.float32)),
        init("scale", r.uniform(0.5, 1.5, c).astype(np.float32)),
        init("shift", r.standard_normal(c).astype(np.float32)),
        init("mean", r.standard_normal(c).astype(np.float32)),
        init("var", r.uniform(0.5, 2.0, c).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["C"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["C", "scale", "shift", "mean", "var"], ["B"]),
        helper.make_node("Add", ["B", "C"], ["Y"]),
    ]
    shape = [1, c, size, size]
    outputs = [helper.make_tensor_value_info("Y", 1, shape)]
    return make_model(nodes, [tensor_info("X", shape)], outputs, inits)


def test_a_conv_with_another_user_is_not_folded():
    model = conv_bn_and_raw_output()
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    assert any(op in conv.function for op in BN_OPS), conv.function
    out, ref = run_both(model, random_feeds(model, seed=32), vm)
    assert_close(out, ref, F32)


def test_zero_variance_channel_with_tiny_epsilon_stays_finite():
    """A channel whose variance is 0 scales by 1/sqrt(eps): large but finite, and the folded
    weights stay within float32 (the fold refuses non-finite values)."""
    model = conv_model(8, 8, (6, 6), epilogue="bn", bias=False, seed=11)
    (var,) = [t for t in model.graph.initializer if t.name == "bn0v"]
    values = numpy_helper.to_array(var).copy()
    values[0] = 0.0
    var.CopyFrom(init("bn0v", values))
    vm, decisions = compile_cpu(model)
    assert not _bn_in_epilogue(decisions)
    out, ref = run_both(model, random_feeds(model, seed=12), vm)
    assert np.all(np.isfinite(out))
    assert_close(out, ref, F32)
