"""LowerQOperatorToQDQ: QOperator ops TVM cannot import become DequantizeLinear -> op -> Q.

What each test asserts, and why that tolerance:

* Hand-made models end in the quantized integers themselves (no trailing DequantizeLinear), so
  a wrong zero point, scale, axis or attribute shows as several steps. onnxruntime's QLinear
  kernels and the lowered float graph both round ``value / y_scale`` half to even once; they may
  differ by one step only where the float value lands within rounding error of a tie (the
  product's quantized rule, :mod:`gconv_compile.compare`). The tests assert that rule and that
  at least 99 % of the elements are exactly equal.
* ``ConvInteger`` is exact (int32 sums of integer products that float32 holds exactly): equal.
* The committed ``*_qop`` fixtures (made by onnxruntime's ``quantize_static``) lowered: their
  float outputs under the calibrated rule (measured bit-identical).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import dead_initializers, init, make_model, rng, tensor_info
from gconv_compile.passes import PASSES, LowerQOperatorToQDQ
from onnx import TensorProto, helper

from gconv_compile.reference import concrete_input_shapes, random_inputs, run_ort_model

FIXTURES = Path(__file__).parent / "fixtures" / "real"
MS = helper.make_opsetid("com.microsoft", 1)
X_SHAPE = (2, 8, 6, 6)
QOPERATOR_OPS = {"QLinearConv", "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearConcat",
                 "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid",
                 "QLinearLeakyRelu"}  # fmt: skip
# Output shapes of the com.microsoft ops on X_SHAPE where they differ from it.
MS_OUT_SHAPES = {"QLinearConcat": (2, 24, 6, 6), "QLinearAveragePool": (2, 8, 3, 3),
                 "QLinearGlobalAveragePool": (2, 8, 1, 1)}  # fmt: skip


def _quantized_input(out_type=TensorProto.UINT8, name="xq", scale=0.02, zero=128):
    """X (float) -> QuantizeLinear -> ``name``: the seeded float inputs become integers."""
    zero_array = np.array(zero, helper.tensor_dtype_to_np_dtype(out_type))
    inits = [init(f"{name}_s", np.float32(scale)), init(f"{name}_z", zero_array)]
    node = helper.make_node("QuantizeLinear", ["x", f"{name}_s", f"{name}_z"], [name])
    return [node], inits


def _qlinear_conv(*, per_channel=True, bias=True, group=2, scale_shape=None, zp_per_channel=None):
    """X -> Q(uint8) -> QLinearConv(int8 weight) -> y uint8, seeded random weights."""
    r = rng(3)
    out, cin = 8, X_SHAPE[1] // group
    nodes, inits = _quantized_input()
    w = r.integers(-127, 128, (out, cin, 3, 3)).astype(np.int8)
    w_s = (r.random(out) * 0.02 + 0.005).astype(np.float32) if per_channel else np.float32(0.01)
    if scale_shape is not None:
        w_s = w_s.reshape(scale_shape)
    w_z = np.zeros(out if zp_per_channel else (), np.int8)
    if zp_per_channel:
        w_z = r.integers(-3, 4, out).astype(np.int8)
    inits += [init("w", w), init("w_s", w_s), init("w_z", w_z),
              init("y_s", np.float32(0.3)), init("y_z", np.uint8(120))]  # fmt: skip
    inputs = ["xq", "xq_s", "xq_z", "w", "w_s", "w_z", "y_s", "y_z"]
    if bias:
        inits.append(init("b", r.integers(-3000, 3000, out).astype(np.int32)))
        inputs.append("b")
    conv = helper.make_node("QLinearConv", inputs, ["y"], name="qconv", group=group,
                            pads=[1, 1, 1, 1], strides=[1, 1], kernel_shape=[3, 3])  # fmt: skip
    return make_model([*nodes, conv], [tensor_info("x", X_SHAPE)],
                      [tensor_info("y", [2, out, 6, 6], TensorProto.UINT8)], inits)  # fmt: skip


def _ms_model(
    op_type, *, operands=1, out_type=TensorProto.UINT8, y_zero=True, shape=X_SHAPE, **attrs
):
    """X -> Q -> com.microsoft ``op_type`` (each operand its own scale and zero point) -> y."""
    zero = 128 if out_type == TensorProto.UINT8 else -3
    nodes, inits = [], []
    for i in range(operands):
        more, params = _quantized_input(out_type, f"q{i}", scale=0.02 + 0.01 * i, zero=zero + i)
        nodes += more
        inits += params
    triples = [[f"q{i}", f"q{i}_s", f"q{i}_z"] for i in range(operands)]
    inits.append(init("y_s", np.float32(0.025)))
    y_params = ["y_s", "y_z"] if y_zero else ["y_s"]
    if y_zero:
        inits.append(init("y_z", np.array(zero + 5, helper.tensor_dtype_to_np_dtype(out_type))))
    if op_type == "QLinearConcat":
        inputs = y_params + [name for triple in triples for name in triple]
    else:
        inputs = [name for triple in triples for name in triple] + y_params
    node = helper.make_node(op_type, inputs, ["y"], name="qop", domain="com.microsoft", **attrs)
    return make_model([*nodes, node], [tensor_info("x", X_SHAPE)],
                      [tensor_info("y", shape, out_type)], inits,
                      extra_opsets=[MS])  # fmt: skip


def _lower(proto: onnx.ModelProto, **options):
    model = ir.serde.deserialize_model(proto)
    lowering = LowerQOperatorToQDQ(**options)
    return lowering(model), lowering


def _outputs(proto: onnx.ModelProto, model: ir.Model, seeds=(0, 1, 2)):
    reference = ir.serde.deserialize_model(proto)
    shapes = concrete_input_shapes(reference, None)
    feeds = [random_inputs(reference, seed, shapes) for seed in seeds]
    before = run_ort_model(reference, feeds)
    after = run_ort_model(model, feeds)
    return [(b[k], a[k]) for b, a in zip(before, after, strict=True) for k in b]


def _assert_quantized_equal(proto, model, ort_equal, *, exact=False):
    """The product's rule (one step at most), then: most elements (or all) exactly equal."""
    ort_equal(proto, model, seeds=(0, 1, 2))
    for before, after in _outputs(proto, model):
        assert before.dtype == after.dtype and len(np.unique(before)) > 4
        diff = np.abs(before.astype(np.int64) - after.astype(np.int64))
        assert diff.max() <= (0 if exact else 1)
        assert (diff == 0).mean() >= 0.99


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


@pytest.mark.parametrize(
    "options",
    [
        {"per_channel": True},
        {"per_channel": False},
        {"per_channel": False, "scale_shape": [1]},
        {"per_channel": True, "zp_per_channel": True},
        {"per_channel": False, "zp_per_channel": True},
        {"per_channel": True, "bias": False, "group": 1},
        {"per_channel": True, "group": 8},
    ],
    ids=["per-channel", "per-tensor", "per-tensor-1-element-scale", "per-channel-zero-points",
         "one-scale-per-channel-zero-points", "no-bias-group-1", "depthwise"],
)  # fmt: skip
def test_qlinear_conv_becomes_dq_conv_q(options, ort_equal):
    proto = _qlinear_conv(**options)
    result, lowering = _lower(proto)
    assert result.modified is True and not lowering.skips
    model = result.model
    assert _ops(model) == (["QuantizeLinear"] + ["DequantizeLinear"] * (2 + options.get("bias", 1))
                           + ["Conv", "QuantizeLinear"])  # fmt: skip
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.attributes["group"].as_int() == options.get("group", 2)
    assert list(conv.attributes["pads"].as_ints()) == [1, 1, 1, 1]
    weight_dq = conv.inputs[1].producer()
    per_channel = options["per_channel"] or options.get("zp_per_channel", False)
    assert ("axis" in weight_dq.attributes) == per_channel
    assert model.graph.outputs[0].name == "y" and not dead_initializers(model.graph)
    _assert_quantized_equal(proto, model, ort_equal)


@pytest.mark.parametrize(
    ("op_type", "float_op", "operands", "attrs"),
    [
        ("QLinearAdd", "Add", 2, {}),
        ("QLinearMul", "Mul", 2, {}),
        ("QLinearConcat", "Concat", 3, {"axis": 1}),
        ("QLinearAveragePool", "AveragePool", 1,
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("QLinearGlobalAveragePool", "GlobalAveragePool", 1, {}),
        ("QLinearSigmoid", "Sigmoid", 1, {}),
        ("QLinearLeakyRelu", "LeakyRelu", 1, {"alpha": 0.1}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)  # fmt: skip
@pytest.mark.parametrize("out_type", [TensorProto.UINT8, TensorProto.INT8], ids=["uint8", "int8"])
def test_com_microsoft_qlinear_ops_become_dq_op_q(op_type, float_op, operands, attrs, out_type,
                                                  ort_equal):  # fmt: skip
    shape = MS_OUT_SHAPES.get(op_type, X_SHAPE)
    proto = _ms_model(op_type, operands=operands, out_type=out_type, shape=shape, **attrs)
    result, lowering = _lower(proto)
    assert result.modified is True and not lowering.skips
    ops = _ops(result.model)
    assert ops[-2:] == [float_op, "QuantizeLinear"] and ops.count("DequantizeLinear") == operands
    lowered = next(n for n in result.model.graph if n.op_type == float_op)
    assert set(lowered.attributes) == set(attrs)
    for name, expected in attrs.items():
        np.testing.assert_allclose(lowered.attributes[name].value, expected, rtol=1e-7)
    _assert_quantized_equal(proto, result.model, ort_equal)


def test_an_absent_output_zero_point_is_zero_of_the_output_type(ort_equal):
    """QuantizeLinear without a zero point writes uint8; an int8 QLinearAdd must stay int8."""
    proto = _ms_model("QLinearAdd", operands=2, out_type=TensorProto.INT8, y_zero=False)
    result, _ = _lower(proto)
    quantize = next(n for n in reversed(list(result.model.graph)) if n.op_type == "QuantizeLinear")
    assert quantize.inputs[2].const_value.numpy() == 0
    assert quantize.inputs[2].const_value.numpy().dtype == np.int8
    _assert_quantized_equal(proto, result.model, ort_equal)


def _conv_integer(weight_scale: int):
    r = rng(4)
    nodes, inits = _quantized_input()
    inits += [init("w", r.integers(-weight_scale, weight_scale + 1, (8, 8, 3, 3)).astype(np.int8)),
              init("w_z", np.int8(2))]  # fmt: skip
    conv = helper.make_node("ConvInteger", ["xq", "w", "xq_z", "w_z"], ["y"], name="iconv",
                            pads=[1, 1, 1, 1])  # fmt: skip
    return make_model([*nodes, conv], [tensor_info("x", X_SHAPE)],
                      [tensor_info("y", [2, 8, 6, 6], TensorProto.INT32)], inits)  # fmt: skip


def test_conv_integer_becomes_an_exact_float_conv_and_cast(ort_equal):
    proto = _conv_integer(100)  # 72 products of at most 255 * 102 per sum: exact in float32
    result, _ = _lower(proto)
    assert result.modified is True
    assert _ops(result.model)[-2:] == ["Conv", "Cast"]
    _assert_quantized_equal(proto, result.model, ort_equal, exact=True)


def _big_conv_integer():
    """64 input channels of weights near +-127: sums can reach 255 * 127 * 576 > 2**24."""
    r = rng(6)
    nodes, inits = _quantized_input()
    inits.append(init("w", r.integers(100, 128, (4, 64, 3, 3)).astype(np.int8)))
    conv = helper.make_node("ConvInteger", ["xq", "w"], ["y"], name="iconv")
    return make_model([*nodes, conv], [tensor_info("x", [1, 64, 5, 5])],
                      [tensor_info("y", [1, 4, 3, 3], TensorProto.INT32)], inits)  # fmt: skip


def _channels_last_pool():
    return _ms_model("QLinearGlobalAveragePool", channels_last=1, shape=(2, 1, 1, 6))  # NHWC


def _opset_12_conv():
    proto = _qlinear_conv(per_channel=False)
    proto.opset_import[0].version = 12
    return proto


def _computed_weight_scale():
    proto = _qlinear_conv()
    proto.graph.node.insert(0, helper.make_node("Abs", ["w_s"], ["w_s_computed"]))
    next(n for n in proto.graph.node if n.op_type == "QLinearConv").input[4] = "w_s_computed"
    return proto


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_channels_last_pool, "channels_last"),
        (_opset_12_conv, "opset 12"),
        (_computed_weight_scale, "weight scale or zero point of qconv is not a constant"),
        (_big_conv_integer, "exact integers"),
    ],
    ids=["channels-last-pool", "opset-12", "computed-weight-scale", "conv-integer-overflow"],
)
def test_what_cannot_be_lowered_exactly_is_refused_with_the_reason(make, reason):
    proto = make()
    result, lowering = _lower(proto)
    assert result.modified is False
    assert len(lowering.skips) == 1 and reason in lowering.skips[0].reason
    assert list(ir.serde.serialize_model(result.model).graph.node) == list(proto.graph.node)


def test_a_float_model_is_left_alone():
    x = tensor_info("x", X_SHAPE)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    proto = make_model([conv], [x], [tensor_info("y", [2, 4, 4, 4])],
                       [init("w", rng(1).standard_normal((4, 8, 3, 3)).astype(np.float32))])  # fmt: skip
    result, lowering = _lower(proto)
    assert result.modified is False and not lowering.skips and not lowering.rewrites


def test_the_users_unused_initializers_stay():
    proto = _qlinear_conv()
    proto.graph.initializer.append(init("unused", np.float32(1.5)))
    result, _ = _lower(proto)
    assert dead_initializers(result.model.graph) == ["unused"]


def test_registered_under_its_cli_name():
    assert PASSES["lower-qoperator-to-qdq"] is LowerQOperatorToQDQ


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*_qop.onnx")), ids=lambda p: p.stem)
def test_quantize_static_qoperator_fixtures_lower_completely(path, ort_equal):
    proto = onnx.load(path)
    result, lowering = _lower(proto)
    assert result.modified is True and not lowering.skips
    assert not QOPERATOR_OPS & set(_ops(result.model))
    assert all(n.domain in ("", "ai.onnx") for n in result.model.graph)
    ort_equal(proto, result.model, seeds=(0, 1))
    for before, after in _outputs(proto, result.model, seeds=(0,)):
        np.testing.assert_array_equal(before, after)  # measured bit-identical
