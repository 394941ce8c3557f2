"""Regressions from real PyTorch (TorchScript) exports, issue #11 items 1, 2 and 4.

1. ``view(x.size(0), ...)`` and LRN exports take the shape evaluator through
   ``Shape -> Gather(scalar index) -> Unsqueeze``: a scalar met ``.ndim`` and crashed
   ``optimize``. The evaluator now answers "unknown" for anything it cannot fold, never raises.
2. One BN-fused ``nn.Conv2d`` applied to every chunk: TorchScript writes the second use of its
   weight as ``Identity(initializer)``. Constants are read through Identity chains.
4. ``expand`` then ``optimize`` of a depthwise conv with more than 64 channels: the Split's
   sizes (one per group) were ignored by the evaluator's 64-entry limit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import GraphBuilder, any_tensor, tensor_info
from gconv_compile.passes import ExpandGroupedConv, FoldSliceBounds, FoldSplitConvConcat
from gconv_compile.passes._common import const_array
from gconv_compile.passes._shapes import ShapeFacts
from onnx import TensorProto, helper

import gconv_compile


def _values(proto: onnx.ModelProto) -> tuple[ir.Model, dict[str, ir.Value]]:
    model = ir.serde.deserialize_model(proto)
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    return model, values


def _fold(proto: onnx.ModelProto) -> tuple[ir.passes.PassResult, FoldSplitConvConcat]:
    fold = FoldSplitConvConcat()
    return fold(ir.serde.deserialize_model(proto)), fold


def _scalar(b: GraphBuilder, value: int) -> str:
    return b.const(np.array(value, np.int64), "scalar")


# ---------------------------------------------------------------- 1. the shape evaluator


def _view_batch_model() -> onnx.ModelProto:
    """x.view(x.size(0), -1) and x[:, :x.size(1)] as TorchScript writes them."""
    b = GraphBuilder()
    shape = b.op("Shape", ["X"], out="shape")
    b.op("Gather", [shape, _scalar(b, 0)], axis=0, out="batch")  # scalar: symbolic N
    b.op("Gather", [shape, _scalar(b, 1)], axis=0, out="channels")  # scalar: 8
    b.op("Unsqueeze", ["batch", b.int64([0])], out="batch_1d")
    b.op("Unsqueeze", ["channels", b.int64([0])], out="channels_1d")
    b.op("Concat", ["batch_1d", b.int64([-1])], axis=0, out="view_shape")
    b.op("Reshape", ["X", "view_shape"], out="Y")
    return b.model([tensor_info("X", ["N", 8, 6, 5])], [any_tensor("Y", 2)])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("channels_1d", [8], id="static-dim-through-scalar-gather-unsqueeze"),
        pytest.param("channels", 8, id="scalar-gather"),
        pytest.param("batch_1d", None, id="symbolic-batch-is-unknown"),
        pytest.param("view_shape", None, id="view-shape-with-symbolic-batch-is-unknown"),
    ],
)
def test_scalar_gather_then_unsqueeze_is_evaluated(name, expected):
    model, values = _values(_view_batch_model())
    result = ShapeFacts(model).int_values(values[name])
    if expected is None:
        assert result is None
    else:
        assert result is not None and result.tolist() == expected


def _odd_node(op_type: str, inputs: list, **attrs) -> onnx.ModelProto:
    """One node over Shape(X) that a shape evaluator cannot fold (bad indices, axes, ranks)."""
    b = GraphBuilder()
    shape = b.op("Shape", ["X"])
    resolved = [shape if i == "shape" else b.int64(i) if isinstance(i, list) else i for i in inputs]
    b.op(op_type, resolved, out="odd", **attrs)
    b.op("Identity", ["X"], out="Y")
    return b.model([tensor_info("X", [2, 8, 6, 5])], [any_tensor("Y")])


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: _odd_node("Gather", ["shape", [7]], axis=0), id="gather-out-of-range"),
        pytest.param(lambda: _odd_node("Unsqueeze", ["shape", [5]]), id="unsqueeze-bad-axis"),
        pytest.param(lambda: _odd_node("Squeeze", ["shape", [0]]), id="squeeze-non-unit-axis"),
        pytest.param(lambda: _odd_node("Reshape", ["shape", [3, 3]]), id="reshape-wrong-size"),
        pytest.param(lambda: _odd_node("Concat", ["shape", [[1]]], axis=3), id="concat-bad-axis"),
        pytest.param(lambda: _odd_node("Slice", ["shape", [0], [2], [1]]), id="slice-bad-axis"),
        pytest.param(lambda: _odd_node("Div", ["shape", [0]]), id="division-by-zero"),
    ],
)  # fmt: skip
def test_the_evaluator_answers_unknown_and_never_raises(build):
    model, values = _values(build())
    assert ShapeFacts(model).int_values(values["odd"]) is None


def _chunk_with_scalar_gather_bounds(*, view: bool = False) -> onnx.ModelProto:
    """Two branches; the second Slice ends at Unsqueeze(Gather(Shape(X), 1)), i.e. at C.

    ``view``: then ``y.view(y.size(0), -1)`` with the batch left dynamic.
    """
    b = GraphBuilder(3)
    channels = b.op("Gather", [b.op("Shape", ["X"]), _scalar(b, 1)], axis=0)
    end = b.op("Unsqueeze", [channels, b.int64([0])])
    parts = [
        b.slice("X", 0, 4),
        b.op("Slice", ["X", b.int64([4]), end, b.int64([1])]),
    ]
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in parts]
    if not view:
        b.op("Concat", outs, axis=1, out="Y")
        return b.model([tensor_info("X", ["N", 8, 6, 5])], [any_tensor("Y")])
    y = b.op("Concat", outs, axis=1)
    batch = b.op("Gather", [b.op("Shape", [y]), _scalar(b, 0)], axis=0)
    shape = b.op("Concat", [b.op("Unsqueeze", [batch, b.int64([0])]), b.int64([-1])], axis=0)
    b.op("Reshape", [y, shape], out="Y")
    return b.model([tensor_info("X", ["N", 8, 6, 5])], [any_tensor("Y", 2)])


def test_fold_reads_slice_bounds_through_scalar_gather_unsqueeze(ort_equal):
    before = _chunk_with_scalar_gather_bounds()
    result, fold = _fold(before)
    assert result.modified is True, [s.reason for s in fold.skips]
    assert fold.rewrites[0].details["group"] == 2
    ort_equal(before, result.model)


def test_fold_slice_bounds_makes_the_scalar_gather_bound_constant(ort_equal):
    before = _chunk_with_scalar_gather_bounds()
    bounds = FoldSliceBounds()
    model = ir.serde.deserialize_model(before)
    assert bounds(model).modified is True
    assert not [n for n in model.graph if n.op_type in ("Shape", "Gather", "Unsqueeze")]
    ort_equal(before, model)


def test_optimize_runs_on_a_view_with_dynamic_batch():
    """The crash was an uncaught AttributeError in optimize (exit 3 on the CLI)."""
    before = _chunk_with_scalar_gather_bounds(view=True)
    optimized, report = gconv_compile.optimize(before, shapes={"X": [2, 8, 6, 5]})
    assert [r.details["group"] for r in report.rewrites] == [2]
    assert report.check is not None and report.check.passed


# ---------------------------------------------------------------- 2. Identity(initializer)


def _shared_conv(*, overridable: bool = False) -> onnx.ModelProto:
    """One Conv applied to both chunks: the second use reads Identity(W), Identity(Identity(B))."""
    b = GraphBuilder(5)
    weight = b.random((4, 4, 3, 3), "w")
    bias = b.random((4,), "b")
    parts = b.split("X", [4, 4], form="split13")
    first = b.op("Conv", [parts[0], weight, bias], pads=[1] * 4, name="conv_0")
    weight_copy = b.op("Identity", [weight])
    bias_copy = b.op("Identity", [b.op("Identity", [bias])])
    second = b.op("Conv", [parts[1], weight_copy, bias_copy], pads=[1] * 4, name="conv_1")
    b.op("Concat", [first, second], axis=1, out="Y")
    inputs = [tensor_info("X", ["N", 8, 6, 5])]
    if overridable:  # W may be fed at run time: not a constant, even through Identity
        inputs.append(tensor_info(weight, [4, 4, 3, 3]))
    return b.model(inputs, [any_tensor("Y")])


def test_shared_weight_through_identity_folds(ort_equal):
    before = _shared_conv()
    result, fold = _fold(before)
    assert result.modified is True, [s.reason for s in fold.skips]
    assert fold.rewrites[0].details["weight_shape"] == [8, 4, 3, 3]
    graph = result.model.graph
    assert [n.op_type for n in graph] == ["Conv"]  # the Identity copies went with the branches
    weight = const_array(next(iter(graph)).inputs[1])
    np.testing.assert_array_equal(weight[:4], weight[4:])  # both groups: the one shared weight
    ort_equal(before, result.model)


def test_identity_of_an_overridable_initializer_is_not_a_constant():
    result, fold = _fold(_shared_conv(overridable=True))
    assert result.modified is False
    assert [s.reason for s in fold.skips] == ["weight of conv_0 is not a constant"]


@pytest.mark.parametrize("mode", ["split", "dense"])
def test_expand_reads_a_weight_through_identity(mode, ort_equal):
    b = GraphBuilder(6)
    weight = b.op("Identity", [b.op("Identity", [b.random((8, 2, 3, 3), "w")])])
    b.op("Conv", ["X", weight, b.random((8,), "b")], group=4, pads=[1] * 4, out="Y", name="g")
    before = b.model([tensor_info("X", ["N", 8, 6, 5])], [any_tensor("Y")])
    model = ir.serde.deserialize_model(before)
    expand = ExpandGroupedConv(mode=mode)
    assert expand(model).modified is True, [s.reason for s in expand.skips]
    assert not [n for n in model.graph if n.op_type == "Identity"]
    ort_equal(before, model)


# ---------------------------------------------------------------- 4. more than 64 groups


@pytest.mark.parametrize("channels", [65, 72, 256])
def test_expand_then_fold_a_wide_depthwise_conv_round_trips(channels, ort_equal):
    b = GraphBuilder(7)
    b.op("Conv", ["X", b.random((channels, 1, 3, 3), "w"), b.random((channels,), "b")],
         group=channels, pads=[1] * 4, out="Y", name="dw")  # fmt: skip
    before = b.model([tensor_info("X", ["N", channels, 5, 4])], [any_tensor("Y")])
    model = ir.serde.deserialize_model(before)
    assert ExpandGroupedConv()(model).modified is True
    fold = FoldSplitConvConcat()
    assert fold(model).modified is True, [s.reason for s in fold.skips]
    (conv,) = [n for n in model.graph if n.op_type == "Conv"]
    assert conv.attributes["group"].as_int() == channels
    original = onnx.numpy_helper.to_array(before.graph.initializer[0])
    np.testing.assert_array_equal(const_array(conv.inputs[1]), original)
    ort_equal(before, model)


def test_optimize_folds_what_expand_wrote_for_72_channels():
    """The issue's report, through the public API: expand, then optimize."""
    b = GraphBuilder(8)
    b.op("Conv", ["X", b.random((72, 1, 3, 3), "w")], group=72, pads=[1] * 4, out="Y")
    before = b.model([tensor_info("X", ["N", 72, 5, 4])], [any_tensor("Y")])
    expanded, _ = gconv_compile.expand(before)
    optimized, report = gconv_compile.optimize(expanded)
    assert report.skips == [] and [r.details["group"] for r in report.rewrites] == [72]
    assert report.check is not None and report.check.passed


def test_int_constants_are_read_up_to_the_memory_bound():
    sizes = np.arange(1, 1001, dtype=np.int64)
    huge = np.zeros(1 << 17, np.int64)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])],
        [onnx.numpy_helper.from_array(sizes, "sizes"), onnx.numpy_helper.from_array(huge, "huge")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(helper.make_model(graph))
    facts = ShapeFacts(model)
    assert facts.int_values(model.graph.initializers["sizes"]).tolist() == sizes.tolist()
    assert facts.int_values(model.graph.initializers["huge"]) is None
