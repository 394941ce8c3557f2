"""Expanding grouped convolutions of quantized models (QDQ and QLinearConv), split and dense.

Exactness, and what each test asserts:

* ``QLinearConv``: every output channel is the same int32 sum of the same integer products,
  requantized with the same scales, whether its group runs inside the grouped conv or alone;
  the outputs must be **bit-identical**.
* QDQ (``DQ -> Conv(DQ(w), DQ(b)) -> Q -> DQ``): the weights dequantize to the same floats, and
  each branch's Conv computes its output channels from the same input slice. onnxruntime's CPU
  Conv computes a grouped conv one group at a time with the same GEMM shape a branch has, so the
  outputs are bit-identical too (asserted); the product's check would allow one quantization
  step where a float sum lands on a rounding tie.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import make_model, rng, tensor_info
from gconv_compile.passes import ExpandGroupedConv
from onnx import TensorProto, helper, numpy_helper

from gconv_compile.reference import concrete_input_shapes, random_inputs, run_ort_model

CHANNELS, GROUP, OUT, SPATIAL = 8, 4, 8, (5, 5)


def _quantize(array: np.ndarray, dtype, axis: int | None):
    """Symmetric-ish int quantization of ``array`` (per-tensor or per-axis) with random zp."""
    info = ml_dtypes.iinfo(dtype) if dtype in (ml_dtypes.int4, ml_dtypes.uint4) else np.iinfo(dtype)
    span = float(info.max) - float(info.min)
    if axis is None:
        scale = np.float32(np.abs(array).max() * 2 / span)
        zero = np.array(int(info.min + span / 2), dtype)
        values = np.clip(np.round(array / scale) + int(zero), info.min, info.max).astype(dtype)
        return values, np.array(scale, np.float32), zero
    moved = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    scale = (np.abs(moved).max(axis=1) * 2 / span).astype(np.float32)
    zero = rng(5).integers(int(info.min / 4), int(info.max / 4) + 1, len(scale)).astype(dtype)
    shape = [1] * array.ndim
    shape[axis] = -1
    q = np.round(array / scale.reshape(shape)) + zero.astype(np.int64).reshape(shape)
    return np.clip(q, info.min, info.max).astype(dtype), scale, zero


def _t(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def qdq_grouped_conv(
    *,
    dtype=np.int8,
    axis=0,
    bias=True,
    opset=17,
    block_size=0,
    group=GROUP,
    op="Conv",
    block_axis=1,
):
    """X -> Q -> DQ -> Conv(DQ(w), DQ(b), group) -> Q -> DQ -> Y, seeded random weights.

    ``op="ConvTranspose"``: weight [C_in, C_out/group, 3, 3], per channel on ``axis`` 1 (its
    output channels), bias per tensor."""
    r = rng(1)
    shape = (OUT, CHANNELS // group, 3, 3) if op == "Conv" else (CHANNELS, OUT // group, 3, 3)
    weight = r.standard_normal(shape).astype(np.float32)
    w, ws, wz = _quantize(weight, dtype, axis)
    inits = [
        _t("w_q", w), _t("w_s", ws), _t("w_z", wz),
        _t("x_s", np.float32(0.05)), _t("x_z", np.int8(3)),
        _t("y_s", np.float32(0.2)), _t("y_z", np.int8(-2)),
    ]  # fmt: skip
    if block_size:  # blocks along block_axis: the scale has the weight's rank
        params = list(shape)
        params[block_axis] = -(-shape[block_axis] // block_size)
        inits[1] = _t("w_s", (0.005 + 0.01 * r.random(params)).astype(np.float32))
        inits[2] = _t("w_z", r.integers(-3, 4, params).astype(dtype))
    dq_w = {"axis": axis} if axis is not None else {}
    if block_size:
        dq_w = {"axis": block_axis, "block_size": block_size}
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "x_s", "x_z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], **dq_w),
    ]
    conv_inputs = ["xd", "wd"]
    if bias:
        b = r.integers(-500, 500, OUT).astype(np.int32)
        bs = (0.05 * np.asarray(ws, np.float32)).astype(np.float32)
        if op != "Conv":
            bs = np.float32(0.002)
        inits += [_t("b_q", b), _t("b_s", bs)]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["bd"], axis=0))
        conv_inputs.append("bd")
    nodes += [
        helper.make_node(op, conv_inputs, ["c"], name="gconv", group=group, pads=[1] * 4),
        helper.make_node("QuantizeLinear", ["c", "y_s", "y_z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["Y"]),
    ]
    x = tensor_info("X", ["N", CHANNELS, *SPATIAL])
    y = tensor_info("Y", ["N", OUT, *SPATIAL])
    return make_model(nodes, [x], [y], inits, opset=opset)


def qlinear_grouped_conv(*, per_channel=True, dtype=np.uint8, bias=True, group=GROUP):
    """X -> QuantizeLinear -> QLinearConv(group) -> DequantizeLinear -> Y."""
    r = rng(2)
    weight = r.standard_normal((OUT, CHANNELS // group, 3, 3)).astype(np.float32)
    w, ws, wz = _quantize(weight, np.int8, 0 if per_channel else None)
    wz = np.zeros_like(wz)  # onnxruntime's QLinearConv takes symmetric int8 weights
    x_zero = np.array(128 if dtype == np.uint8 else 0, dtype)
    inits = [
        _t("x_s", np.float32(0.03)), _t("x_z", x_zero), _t("w_q", w), _t("w_s", ws),
        _t("w_z", wz), _t("y_s", np.float32(0.25)), _t("y_z", np.array(100, dtype)),
    ]  # fmt: skip
    inputs = ["xq", "x_s", "x_z", "w_q", "w_s", "w_z", "y_s", "y_z"]
    if bias:
        inits.append(_t("b", r.integers(-2000, 2000, OUT).astype(np.int32)))
        inputs.append("b")
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "x_s", "x_z"], ["xq"]),
        helper.make_node("QLinearConv", inputs, ["yq"], name="gconv", group=group, pads=[1] * 4),
        helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["Y"]),
    ]
    x = tensor_info("X", ["N", CHANNELS, *SPATIAL])
    y = tensor_info("Y", ["N", OUT, *SPATIAL])
    return make_model(nodes, [x], [y], inits)


def _outputs(model, seeds=(0, 1, 2)):
    feeds = [{"X": 3 * rng(seed).standard_normal((2, CHANNELS, *SPATIAL)).astype(np.float32)}
             for seed in seeds]  # fmt: skip
    return [out["Y"] for out in run_ort_model(model, feeds)]


def _expand(proto, **options):
    model = ir.serde.deserialize_model(proto)
    expand = ExpandGroupedConv(**options)
    return expand(model), expand


def _assert_bit_identical(before, after):
    ref, got = _outputs(ir.serde.deserialize_model(before)), _outputs(after)
    for a, b in zip(ref, got):
        assert np.std(a) > 0
        np.testing.assert_array_equal(a, b)


QDQ_CASES = {
    "int8-per-channel": dict(dtype=np.int8, axis=0),
    "int8-per-tensor": dict(dtype=np.int8, axis=None),
    "uint8-per-channel": dict(dtype=np.uint8, axis=0),
    "uint8-per-tensor-no-bias": dict(dtype=np.uint8, axis=None, bias=False),
    "int4-per-channel-opset21": dict(dtype=ml_dtypes.int4, axis=0, opset=21),
    "uint4-per-tensor-opset21": dict(dtype=ml_dtypes.uint4, axis=None, opset=21),
    "depthwise-int8-per-channel": dict(dtype=np.int8, axis=0, group=CHANNELS),
    "convtranspose-per-output-channel": dict(dtype=np.int8, axis=1, op="ConvTranspose"),
    "convtranspose-per-tensor": dict(dtype=np.uint8, axis=None, op="ConvTranspose"),
}


@pytest.mark.parametrize("mode", ["split", "dense"])
@pytest.mark.parametrize("case", QDQ_CASES.values(), ids=QDQ_CASES.keys())
def test_qdq_grouped_conv_expands_bit_identical(case, mode):
    proto = qdq_grouped_conv(**case)
    result, expand = _expand(proto, mode=mode)
    assert result.modified is True, [s.reason for s in expand.skips]
    graph = result.model.graph
    op = case.get("op", "Conv")
    convs = [n for n in graph if n.op_type == op]
    group = case.get("group", GROUP)
    assert len(convs) == (group if mode == "split" else 1)
    for conv in convs:
        assert "group" not in conv.attributes
        weight_dq = conv.inputs[1].producer()
        assert weight_dq.op_type == "DequantizeLinear"
        values = weight_dq.inputs[0].const_value.numpy()
        assert values.dtype == np.dtype(case["dtype"])
        scale = weight_dq.inputs[1].const_value.numpy()
        if case["axis"] == 0:  # the per-channel scales went with their rows
            assert scale.shape == (values.shape[0],)
        elif case["axis"] == 1:  # per output channel of a ConvTranspose group: shared, or tiled
            assert scale.shape == (values.shape[1],)
        else:
            assert scale.size == 1
        if len(conv.inputs) > 2:
            assert conv.inputs[2].producer().op_type == "DequantizeLinear"
    if mode == "split":  # the integers are split, each part dequantized as before
        split = next(n for n in graph if n.op_type == "Split")
        assert split.inputs[0].producer().op_type == "QuantizeLinear"
        assert all(c.inputs[0].producer().op_type == "DequantizeLinear" for c in convs)
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    _assert_bit_identical(proto, result.model)


def test_qdq_dense_weight_off_the_blocks_is_the_zero_point():
    proto = qdq_grouped_conv(dtype=np.int8, axis=0)
    result, _ = _expand(proto, mode="dense")
    (conv,) = [n for n in result.model.graph if n.op_type == "Conv"]
    dq = conv.inputs[1].producer()
    values, scale, zero = (v.const_value.numpy() for v in dq.inputs)
    dense = (values.astype(np.int64) - zero.reshape(-1, 1, 1, 1)) * scale.reshape(-1, 1, 1, 1)
    per_group = CHANNELS // GROUP
    for row in range(OUT):
        group = row // (OUT // GROUP)
        outside = np.delete(dense[row], range(group * per_group, (group + 1) * per_group), 0)
        assert not outside.any()


@pytest.mark.parametrize(
    "case",
    [dict(per_channel=True), dict(per_channel=False), dict(per_channel=True, dtype=np.int8),
     dict(per_channel=True, bias=False)],
    ids=["uint8-per-channel", "uint8-per-tensor", "int8-activations", "no-bias"],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["split", "dense"])
def test_qlinearconv_expands_bit_identical(case, mode):
    proto = qlinear_grouped_conv(**case)
    result, expand = _expand(proto, mode=mode)
    assert result.modified is True, [s.reason for s in expand.skips]
    convs = [n for n in result.model.graph if n.op_type == "QLinearConv"]
    assert len(convs) == (GROUP if mode == "split" else 1)
    assert all("group" not in c.attributes for c in convs)
    if mode == "split":
        split = next(n for n in result.model.graph if n.op_type == "Split")
        assert split.inputs[0].producer().op_type == "QuantizeLinear"  # the integers are split
        scales = [c.inputs[4].const_value.numpy() for c in convs]
        if case["per_channel"]:
            assert all(s.shape == (OUT // GROUP,) for s in scales)
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    _assert_bit_identical(proto, result.model)


BLOCKED = {
    "blocks-along-input-channels": dict(block_size=2, block_axis=1),
    "whole-blocks-along-output-rows": dict(block_size=2, block_axis=0),
}


@pytest.mark.parametrize("mode", ["split", "dense"])
@pytest.mark.parametrize("case", BLOCKED.values(), ids=BLOCKED.keys())
def test_blocked_quantization_expands_by_split_bit_identical(case, mode):
    """Blocked weights (opset 21) are cut with their scales; dense would cut blocks: split."""
    proto = qdq_grouped_conv(dtype=np.int8, axis=None, opset=21, group=2, **case)
    result, expand = _expand(proto, mode=mode)
    assert result.modified is True, expand.skips
    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    assert len(convs) == 2
    for conv in convs:
        dq = conv.inputs[1].producer()
        assert dq.attributes["block_size"].as_int() == 2
        assert dq.inputs[1].const_value.numpy().ndim == 4
    if mode == "dense":
        assert "split instead of dense" in expand.rewrites[0].summary
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    _assert_bit_identical(proto, result.model)


def test_blocks_cut_by_a_group_boundary_are_refused():
    """Blocks of 3 output rows, groups of 4 rows: a group boundary cuts a block."""
    proto = qdq_grouped_conv(dtype=np.int8, axis=None, opset=21, group=2, block_size=3,
                             block_axis=0)  # fmt: skip
    before = _outputs(ir.serde.deserialize_model(proto))
    result, expand = _expand(proto)
    assert result.modified is False
    (skip,) = expand.skips
    assert "gconv: blocked quantization on axis 0 (block_size 3) does not align" in skip.reason
    for a, b in zip(before, _outputs(result.model)):
        np.testing.assert_array_equal(a, b)


def test_computed_quantized_weight_is_refused():
    proto = qdq_grouped_conv()
    # The weight's integers come from a graph input: not a constant.
    proto.graph.initializer.remove(next(i for i in proto.graph.initializer if i.name == "w_q"))
    proto.graph.input.append(tensor_info("w_q", [OUT, CHANNELS // GROUP, 3, 3], TensorProto.INT8))
    result, expand = _expand(proto)
    assert result.modified is False
    assert "weight of gconv is the DequantizeLinear of a computed tensor" in expand.skips[0].reason


def conv_integer_grouped(*, per_channel_zero=True):
    """X (uint8) -> ConvInteger(w uint8, x_zp, w_zp, group) -> Y (int32)."""
    r = rng(4)
    w = r.integers(0, 256, (OUT, CHANNELS // GROUP, 3, 3)).astype(np.uint8)
    w_zero = r.integers(100, 150, OUT).astype(np.uint8) if per_channel_zero else np.uint8(128)
    inits = [_t("w", w), _t("x_z", np.uint8(7)), _t("w_z", w_zero)]
    node = helper.make_node(
        "ConvInteger", ["X", "w", "x_z", "w_z"], ["Y"], name="gconv", group=GROUP, pads=[1] * 4
    )
    x = tensor_info("X", ["N", CHANNELS, *SPATIAL], TensorProto.UINT8)
    y = tensor_info("Y", ["N", OUT, *SPATIAL], TensorProto.INT32)
    return make_model([node], [x], [y], inits)


# onnxruntime's ConvInteger takes one weight zero point only ("Non per-tensor quantization is
# not supported now"), so only that form is checked.
@pytest.mark.parametrize("mode", ["split", "dense"])
def test_conv_integer_expands_bit_identical(mode):
    proto = conv_integer_grouped(per_channel_zero=False)
    result, expand = _expand(proto, mode=mode)
    assert result.modified is True, [s.reason for s in expand.skips]
    convs = [n for n in result.model.graph if n.op_type == "ConvInteger"]
    assert len(convs) == (GROUP if mode == "split" else 1)
    assert all("group" not in c.attributes for c in convs)
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    feeds = [{"X": rng(s).integers(0, 256, (2, CHANNELS, *SPATIAL)).astype(np.uint8)}
             for s in (0, 1)]  # fmt: skip
    before = run_ort_model(ir.serde.deserialize_model(proto), feeds)
    after = run_ort_model(result.model, feeds)
    for a, b in zip(before, after):  # integer sums: exact
        assert np.std(a["Y"]) > 0
        np.testing.assert_array_equal(a["Y"], b["Y"])


# ------------------------------------------------------------ real int8 exports (quantize_static)

REAL = Path(__file__).parent / "fixtures" / "real"
REAL_INT8 = sorted(p.name for p in REAL.glob("*_q*.onnx"))


def real_outputs(model: ir.Model, reference: ir.Model, seeds=(0, 1)) -> list[dict]:
    """Outputs of ``model`` on seeded inputs made for ``reference`` (its symbolic batch: 2)."""
    shapes = concrete_input_shapes(reference, None)
    feeds = [random_inputs(reference, seed, shapes) for seed in seeds]
    return run_ort_model(model, feeds)


def assert_real_bit_identical(proto: onnx.ModelProto, after: ir.Model) -> None:
    reference = ir.serde.deserialize_model(proto)
    before = real_outputs(reference, reference)
    for a, b in zip(before, real_outputs(after, reference)):
        for name, value in a.items():
            assert np.std(value) > 0, name
            np.testing.assert_array_equal(value, b[name], err_msg=name)


@pytest.mark.parametrize("mode", ["split", "dense"])
@pytest.mark.parametrize("name", [n for n in REAL_INT8 if not n.startswith("resnext_chunk")])
def test_real_int8_exports_expand_bit_identical(name, mode):
    """Every grouped (and depthwise) conv of quantize_static's QDQ and QOperator files."""
    proto = onnx.load(REAL / name)
    result, expand = _expand(proto, mode=mode)
    assert result.modified is True and not expand.skips, expand.skips
    assert not [n for n in result.model.graph if _group(n) > 1]
    assert_real_bit_identical(proto, result.model)


def _group(node) -> int:
    attr = node.attributes.get("group")
    return attr.as_int() if attr is not None else 1
