"""Folding split-conv-concat blocks of quantized models (QDQ and QLinearConv).

The QDQ block is what ``onnxruntime.quantization.quantize_static`` writes: a Q/DQ pair on each
Split output and after each branch (each with its own scale), weights and biases as
DequantizeLinear of constants. The folded model must give **bit-identical** outputs: Q and DQ
act on each element with its channel's scale (per-channel Q/DQ repeat each branch's), the
dequantized weights are the same floats, and onnxruntime runs a grouped Conv one group at a
time with the GEMM shape of one branch.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import make_model, rng, tensor_info
from gconv_compile.passes import ExpandGroupedConv, FoldSplitConvConcat
from onnx import helper, numpy_helper
from test_quantized_expand import (
    CHANNELS,
    GROUP,
    OUT,
    REAL,
    SPATIAL,
    _outputs,
    assert_real_bit_identical,
    qdq_grouped_conv,
    qlinear_grouped_conv,
)

BRANCHES, PER_IN, PER_OUT = 4, CHANNELS // 4, OUT // 4


def _t(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def qdq_branchy(
    *, shared=False, weights="per-channel", opset=17, batch_norm=False, float_w=(),
    kernels=(3, 3, 3, 3), output_qdq=True,
):  # fmt: skip
    """X -> Split -> [Q -> DQ -> Conv(DQ w, DQ b) -> Q -> DQ] x 4 -> Concat -> Y."""
    r = rng(3)
    inits, nodes, outs = [_t("sizes", np.full(BRANCHES, PER_IN, np.int64))], [], []
    split_outputs = [f"x{i}" for i in range(BRANCHES)]
    if opset < 13:
        nodes.append(helper.make_node("Split", ["X"], split_outputs, axis=1))
        inits = []
    else:
        nodes.append(helper.make_node("Split", ["X", "sizes"], split_outputs, axis=1))
    for i in range(BRANCHES):
        xs, xz = (0.05, 3) if shared else (0.03 + 0.01 * i, i - 2)
        ys, yz = (0.2, -2) if shared else (0.15 + 0.05 * i, 2 * i - 3)
        k = kernels[i]
        w = r.integers(-127, 128, (PER_OUT, PER_IN, k, k)).astype(np.int8)
        if weights == "per-channel":
            ws = (0.01 + 0.01 * r.random(PER_OUT)).astype(np.float32)
            wz = r.integers(-5, 6, PER_OUT).astype(np.int8)
        else:  # per tensor, a different scale and zero point in each branch
            ws, wz = np.float32(0.01 + 0.003 * i), np.int8(i - 1)
        inits += [
            _t(f"xs{i}", np.float32(xs)), _t(f"xz{i}", np.int8(xz)),
            _t(f"ys{i}", np.float32(ys)), _t(f"yz{i}", np.int8(yz)),
            _t(f"wq{i}", w), _t(f"ws{i}", ws), _t(f"wz{i}", wz),
            _t(f"bq{i}", r.integers(-300, 300, PER_OUT).astype(np.int32)),
            _t(f"bs{i}", (np.float32(xs) * ws).astype(np.float32)),
        ]  # fmt: skip
        weight = f"wd{i}"
        if i in float_w:
            inits.append(_t(f"wf{i}", r.standard_normal((PER_OUT, PER_IN, 3, 3), np.float32)))
            weight = f"wf{i}"
        axis = {"axis": 0} if weights == "per-channel" else {}
        nodes += [
            helper.make_node("QuantizeLinear", [f"x{i}", f"xs{i}", f"xz{i}"], [f"xq{i}"]),
            helper.make_node("DequantizeLinear", [f"xq{i}", f"xs{i}", f"xz{i}"], [f"xd{i}"]),
            helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"],
                             **axis),
            helper.make_node("DequantizeLinear", [f"bq{i}", f"bs{i}"], [f"bd{i}"], **axis),
            helper.make_node("Conv", [f"xd{i}", weight, f"bd{i}"], [f"c{i}"], name=f"conv{i}",
                             pads=[(k - 1) // 2] * 4),
        ]  # fmt: skip
        last = f"c{i}"
        if batch_norm:
            bn = [_t(f"bn{k}{i}", 0.5 + r.random(PER_OUT, np.float32)) for k in "sbmv"]
            inits += bn
            names = [last, *(t.name for t in bn)]
            nodes.append(helper.make_node("BatchNormalization", names, [f"n{i}"], name=f"bn{i}"))
            last = f"n{i}"
        if output_qdq:
            nodes += [
                helper.make_node("QuantizeLinear", [last, f"ys{i}", f"yz{i}"], [f"yq{i}"]),
                helper.make_node("DequantizeLinear", [f"yq{i}", f"ys{i}", f"yz{i}"], [f"y{i}"]),
            ]
            last = f"y{i}"
        outs.append(last)
    nodes.append(helper.make_node("Concat", outs, ["Y"], axis=1, name="cat"))
    x = tensor_info("X", ["N", CHANNELS, *SPATIAL])
    y = tensor_info("Y", ["N", OUT, *SPATIAL])
    return make_model(nodes, [x], [y], inits, opset=opset)


def _fold(proto, **options):
    model = ir.serde.deserialize_model(proto)
    fold = FoldSplitConvConcat(**options)
    return fold(model), fold


def _assert_bit_identical(before, after):
    for a, b in zip(_outputs(ir.serde.deserialize_model(before)), _outputs(after)):
        assert np.std(a) > 0
        np.testing.assert_array_equal(a, b)


def _ops(graph):
    return [n.op_type for n in graph]


FOLD_CASES = {
    "shared-activation-scales-per-channel-weights": dict(shared=True),
    "per-branch-activation-scales": dict(shared=False),
    "per-tensor-weights-differing": dict(weights="per-tensor"),
    "per-tensor-weights-shared-activations": dict(weights="per-tensor", shared=True),
}


@pytest.mark.parametrize("case", FOLD_CASES.values(), ids=FOLD_CASES.keys())
def test_qdq_block_folds_bit_identical(case):
    proto = qdq_branchy(**case)
    result, fold = _fold(proto)
    assert result.modified is True, [s.reason for s in fold.skips]
    graph = result.model.graph
    assert _ops(graph).count("Conv") == 1 and "Split" not in _ops(graph)
    conv = next(n for n in graph if n.op_type == "Conv")
    assert conv.attributes["group"].as_int() == BRANCHES
    weight_dq, bias_dq = (v.producer() for v in conv.inputs[1:3])
    values, scale = (v.const_value.numpy() for v in weight_dq.inputs[:2])
    assert values.dtype == np.int8 and values.shape == (OUT, PER_IN, 3, 3)
    # per-channel weights stay per channel; differing per-tensor ones become per channel
    assert scale.shape == (OUT,)  # per channel, or per-tensor scales that differ made so
    assert bias_dq.op_type == "DequantizeLinear"
    input_dq, output_dq = conv.inputs[0].producer(), graph.outputs[0].producer()
    assert input_dq.op_type == output_dq.op_type == "DequantizeLinear"
    for dq in (input_dq, output_dq):
        activation_scale = dq.inputs[1].const_value.numpy()
        if case.get("shared"):
            assert activation_scale.shape == ()  # per tensor as it was
        else:
            assert dq.attributes["axis"].as_int() == 1
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    _assert_bit_identical(proto, result.model)


def test_qdq_mixconv_embeds_the_integers_around_the_zero_point(ort_equal):
    """Kernels 3/5/3/5 embedded in 5x5: the new positions hold each row's zero point, so they
    dequantize to 0. The float Conv sums more (zero) terms in another order, so the check is
    the float tolerance rather than bit equality (no output Q here: a rounding tie could flip)."""
    proto = qdq_branchy(kernels=(3, 5, 3, 5), output_qdq=False)
    result, fold = _fold(proto, mixconv="always")
    assert result.modified is True, fold.skips
    conv = next(n for n in result.model.graph if n.op_type == "Conv")
    values, _, zero = (v.const_value.numpy() for v in conv.inputs[1].producer().inputs)
    assert values.shape == (OUT, PER_IN, 5, 5)
    border = values[:PER_OUT, :, 0, :]  # branch 0 is 3x3: its 5x5 border is the zero point
    assert (border == zero[:PER_OUT].reshape(-1, 1, 1)).all() and zero[:PER_OUT].any()
    ort_equal(proto, result.model)


REFUSALS = {
    "per-channel-activations-before-opset-13": (
        dict(opset=12, weights="per-tensor"),
        "per-channel quantization needs opset 13 (model: 12)"),
    "quantized-and-float-weights": (
        dict(float_w=(2,)), "branch weights have different types ['float32', 'int8']"),
    "batchnorm-after-quantized-conv": (
        dict(batch_norm=True), "follows a quantized Conv; its scale cannot fold"),
}  # fmt: skip


@pytest.mark.parametrize("case, reason", REFUSALS.values(), ids=REFUSALS.keys())
def test_qdq_block_refusals(case, reason):
    proto = qdq_branchy(**case)
    untouched = ir.serde.serialize_model(ir.serde.deserialize_model(proto)).SerializeToString()
    before = _outputs(ir.serde.deserialize_model(proto))
    result, fold = _fold(proto)
    assert result.modified is False
    (skip,) = fold.skips
    assert reason in skip.reason
    assert ir.serde.serialize_model(result.model).SerializeToString() == untouched
    for a, b in zip(before, _outputs(result.model)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "case",
    [dict(axis=0), dict(axis=None), dict(axis=1, op="ConvTranspose"),
     dict(axis=None, op="ConvTranspose"),
     dict(axis=None, opset=21, block_size=2, block_axis=1),
     dict(axis=None, opset=21, block_size=2, block_axis=0)],
    ids=["per-channel", "per-tensor", "convtranspose-per-output-channel",
         "convtranspose-per-tensor", "blocked-input-channels", "blocked-output-rows"],
)  # fmt: skip
def test_qdq_round_trip_gives_back_the_grouped_conv(case):
    proto = qdq_grouped_conv(**case)
    op = case.get("op", "Conv")
    model = ir.serde.deserialize_model(proto)
    original = next(n for n in model.graph if n.op_type == op)
    weight = [v.const_value.numpy() for v in original.inputs[1].producer().inputs]
    ExpandGroupedConv()(model)
    assert _ops(model.graph).count(op) == GROUP
    result = FoldSplitConvConcat()(model)
    assert result.modified is True
    (conv,) = [n for n in model.graph if n.op_type == op]
    assert conv.attributes["group"].as_int() == GROUP
    folded = [v.const_value.numpy() for v in conv.inputs[1].producer().inputs]
    for a, b in zip(weight, folded):  # the same integers, scales and zero points
        np.testing.assert_array_equal(a.reshape(b.shape), b)
    _assert_bit_identical(proto, model)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_qlinearconv_round_trip(per_channel):
    proto = qlinear_grouped_conv(per_channel=per_channel)
    model = ir.serde.deserialize_model(proto)
    ExpandGroupedConv()(model)
    assert _ops(model.graph).count("QLinearConv") == GROUP
    fold = FoldSplitConvConcat()
    assert fold(model).modified is True, [s.reason for s in fold.skips]
    (conv,) = [n for n in model.graph if n.op_type == "QLinearConv"]
    assert conv.attributes["group"].as_int() == GROUP
    assert "Split" not in _ops(model.graph) and "Concat" not in _ops(model.graph)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    _assert_bit_identical(proto, model)


def test_qlinearconv_branches_with_different_output_scales_are_refused():
    proto = qlinear_grouped_conv()
    model = ir.serde.deserialize_model(proto)
    ExpandGroupedConv()(model)
    branch = [n for n in model.graph if n.op_type == "QLinearConv"][1]
    other = ir.Value(name="y_s_other", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    other.const_value = ir.tensor(np.float32(0.5), name="y_s_other")
    model.graph.register_initializer(other)
    branch.replace_input_with(6, other)
    before = _outputs(model)
    fold = FoldSplitConvConcat()
    assert fold(model).modified is False
    (skip,) = fold.skips
    assert "different output scales or zero points" in skip.reason
    for a, b in zip(before, _outputs(model)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "name",
    sorted(
        p.name
        for p in REAL.glob("*_qdq_p*.onnx")
        if p.name.startswith(("resnext_chunk", "shufflenet_v1"))
    ),
)
def test_real_qdq_exports_fold_bit_identical(name):
    """quantize_static's QDQ ResNeXt (chunk) and ShuffleNet v1: every block folds, exactly."""
    proto = onnx.load(REAL / name)
    model = ir.serde.deserialize_model(proto)
    fold = FoldSplitConvConcat()
    assert fold(model).modified is True and not fold.skips, fold.skips
    assert len(fold.rewrites) == (1 if name.startswith("resnext") else 4)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=False)
    assert_real_bit_identical(proto, model)
