"""Fold pass refusals: every block it must leave alone, with the reason it gives.

Each case checks ``modified is False``, the reason, a byte-identical model and unchanged
onnxruntime outputs. Models and checks come from ``builders`` (``block_model``, ``assert_folds``, ``assert_refused``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import (
    INT64_MAX,
    SYMBOLIC_C,
    SYMBOLIC_C_FEED,
    GraphBuilder,
    any_tensor,
    assert_refused,
    block_model,
    branch_value,
    checked,
    conv_block,
    kernel_override,
    producer_of,
    run_fold,
    tensor_info,
)
from onnx import TensorProto, helper

# ------------------------------------------------------------------------ negative cases


def _strided_slices() -> onnx.ModelProto:
    b = GraphBuilder()
    parts = [b.slice("X", start, INT64_MAX, step=2) for start in (0, 1)]
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in parts]
    b.op("Concat", outs, axis=1, out="Y")
    return b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])


def _spatial_split(kind: str) -> onnx.ModelProto:
    b = GraphBuilder()
    if kind == "split":
        parts = b.split("X", [4, 4], form="split13", axis=2)
    else:
        parts = [b.slice("X", 0, 4, axis=2), b.slice("X", 4, 8, axis=-2)]
    outs = [b.conv(p, 8, 4, (3, 3), pads=[1] * 4) for p in parts]
    b.op("Concat", outs, axis=1, out="Y")
    return b.model([tensor_info("X", ["N", 8, 8, 6])], [any_tensor("Y")])


def _extra_consumer(steps_back: int = 0, as_output: bool = False, **block) -> onnx.ModelProto:
    """Give a value inside branch 0 a second use: another node, or the graph outputs."""
    proto = block_model(**block)
    name = branch_value(proto, steps_back)
    if as_output:
        proto.graph.output.append(any_tensor(name))
    else:
        proto.graph.node.append(helper.make_node("Sigmoid", [name], ["Z"], name="other_user"))
        proto.graph.output.append(any_tensor("Z"))
    return checked(proto)


def _weight_graph_input(which: int = 1, overridable: bool = False) -> onnx.ModelProto:
    """Branch 0's weight (which=1) or bias (which=2) is a graph input, or an overridable initializer."""
    proto = block_model()
    conv = producer_of(proto, branch_value(proto))
    name = conv.input[which]
    (tensor,) = [t for t in proto.graph.initializer if t.name == name]
    proto.graph.input.append(tensor_info(name, list(tensor.dims)))
    if not overridable:
        proto.graph.initializer.remove(tensor)
    return checked(proto)


def _mixed_conv_and_transpose() -> onnx.ModelProto:
    b = GraphBuilder()
    parts = b.split("X", [4, 4], form="split13")
    c0 = b.conv(parts[0], 4, 4, (1, 1))
    c1 = b.conv(parts[1], 4, 4, (1, 1), transpose=True)
    b.op("Concat", [c0, c1], axis=1, out="Y")
    return b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])


def _concat_input_not_conv() -> onnx.ModelProto:
    """The foreign input sits between the branches, so no run of two is left to fold (runs
    of branches beside other inputs fold: tests/test_passes_fold_concat_runs.py)."""
    b = GraphBuilder()
    parts = b.split("X", [4, 4, 4], form="split13")
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in (parts[0], parts[2])]
    b.op("Concat", [outs[0], b.op("Relu", [parts[1]]), outs[1]], axis=1, out="Y")
    return b.model([tensor_info("X", ["N", 12, 7, 6])], [any_tensor("Y")])


def _different_sources() -> onnx.ModelProto:
    b = GraphBuilder()
    x0, _ = b.split("X", [4, 4], form="split13")
    _, x1 = b.split("X2", [4, 4], form="split13")
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in (x0, x1)]
    b.op("Concat", outs, axis=1, out="Y")
    inputs = [tensor_info("X", ["N", 8, 7, 6]), tensor_info("X2", ["N", 8, 7, 6])]
    return b.model(inputs, [any_tensor("Y")])


def _conv_on_graph_inputs() -> onnx.ModelProto:
    b = GraphBuilder()
    outs = [b.conv(x, 4, 4, (3, 3), pads=[1] * 4) for x in ("X0", "X1")]
    b.op("Concat", outs, axis=1, out="Y")
    inputs = [tensor_info("X0", ["N", 4, 7, 6]), tensor_info("X1", ["N", 4, 7, 6])]
    return b.model(inputs, [any_tensor("Y")])


def _computed_bounds(kind: str) -> onnx.ModelProto:
    """Slice starts or Split sizes computed from an input, not provable statically."""
    b = GraphBuilder()
    if kind == "slice":
        # 4 at run time, but only a runtime reduction shows it.
        zero_k = b.op("Mul", [b.op("ReduceMax", ["K"], keepdims=1), b.int64([0])])
        start = b.op("Add", [zero_k, b.int64([4])])
        parts = [b.slice("X", 0, 4), b.op("Slice", ["X", start, b.int64([8]), b.int64([1])])]
        inputs = [tensor_info("X", ["N", 8, 7, 6]), tensor_info("K", [1], TensorProto.INT64)]
    else:
        zero_k = b.op("Mul", [b.op("ReduceMax", ["K"], keepdims=1), b.int64([0])])
        sizes = b.op("Concat", [b.int64([4]), b.op("Add", [zero_k, b.int64([4])])], axis=0)
        parts = b.op("Split", ["X", sizes], outputs=2, axis=1)
        inputs = [tensor_info("X", ["N", 8, 7, 6]), tensor_info("K", [1], TensorProto.INT64)]
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in parts]
    b.op("Concat", outs, axis=1, out="Y")
    return b.model(inputs, [any_tensor("Y")])


def test_split_sizes_folded_from_constant_arithmetic(ort_equal):
    """Split sizes computed by a Concat of constants are proven statically and fold."""
    b = GraphBuilder()
    sizes = b.op("Concat", [b.int64([4]), b.int64([4])], axis=0)
    parts = b.op("Split", ["X", sizes], outputs=2, axis=1)
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in parts]
    b.op("Concat", outs, axis=1, out="Y")
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])
    result, fold_pass = run_fold(proto)
    assert result.modified is True and len(fold_pass.rewrites) == 1
    assert fold_pass.rewrites[0].details["group"] == 2
    assert [n.op_type for n in result.model.graph] == ["Conv"]
    ort_equal(proto, result.model)


def _clip_bound_input() -> onnx.ModelProto:
    proto = block_model(activation="Clip")
    clip = producer_of(proto, branch_value(proto))
    clip.input[2] = "clip_max"
    proto.graph.input.append(tensor_info("clip_max", []))
    return checked(proto)


SAME_PADS = {"pads": [1] * 4}


def _concat_same_branch_twice() -> onnx.ModelProto:
    b = GraphBuilder()
    parts = b.split("X", [4, 4], form="split13")
    c0 = b.conv(parts[0], 4, 4, (3, 3), pads=[1] * 4)
    b.op("Concat", [c0, c0], axis=1, out="Y")
    return b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])


REFUSALS = [
    pytest.param(
        _concat_same_branch_twice,
        "used more than once by the Concat",
        {},
        id="concat-reads-one-branch-twice",
    ),
    pytest.param(
        lambda: block_model(channels=10, sizes=[4, 4, 2], form="chunk"),
        "uneven split sizes [4, 4, 2]",
        {},
        id="chunk-uneven-c10-n3",
    ),
    pytest.param(
        lambda: block_model(form="chunk", x_shape=SYMBOLIC_C),
        "channel dimension of 'X' is symbolic",
        {"shapes": SYMBOLIC_C_FEED},
        id="chunk-symbolic-channels",
    ),
    pytest.param(
        lambda: block_model(channels=12, sizes=[4, 8]),
        "uneven split sizes [4, 8]",
        {},
        id="uneven-split-sizes",
    ),
    pytest.param(
        lambda: block_model(channels=10, sizes=[3, 3, 3, 1], form="split18"),
        "uneven split sizes [3, 3, 3, 1]",
        {},
        id="uneven-tail-split18-c10-n4",
    ),
    pytest.param(
        lambda: block_model(channels=10, ranges=[(0, 4), (4, 10)], form="slice"),
        "uneven split sizes [4, 6]",
        {},
        id="uneven-slices",
    ),
    pytest.param(
        lambda: block_model(concat_order=[1, 0]), "Concat order", {}, id="concat-order-swapped"
    ),
    pytest.param(
        lambda: block_model(channels=12, n=3, form="slice", concat_order=[0, 2, 1]),
        "Concat order",
        {},
        id="concat-order-slices",
    ),
    pytest.param(
        lambda: block_model(channels=10, ranges=[(0, 6), (4, 10)], form="slice"),
        "overlapping slices",
        {},
        id="overlapping-slices",
    ),
    pytest.param(_strided_slices, "strided slice (step 2)", {}, id="strided-slice"),
    pytest.param(
        lambda: block_model(channels=10, ranges=[(0, 4), (6, 10)], form="slice"),
        "channels [4:6) between slices are skipped",
        {},
        id="interior-gap",
    ),
    pytest.param(lambda: _spatial_split("split"), "splits axis 2", {}, id="split-on-spatial-axis"),
    pytest.param(
        lambda: _spatial_split("slice"), "slices axes [2]", {}, id="slice-on-spatial-axis"
    ),
    pytest.param(
        lambda: block_model(concat_axis=2), "Concat is on axis 2", {}, id="concat-on-spatial-axis"
    ),
    pytest.param(
        lambda: block_model(concat_axis=-1), "Concat is on axis 3", {}, id="concat-on-last-axis"
    ),
    pytest.param(
        lambda: _extra_consumer(1, batch_norm=True, activation="Relu"),
        "also used by ['other_user']",
        {},
        id="bn-output-second-consumer",
    ),
    pytest.param(
        lambda: _extra_consumer(2, batch_norm=True, activation="Relu"),
        "also used by ['other_user']",
        {},
        id="conv-output-under-bn-second-consumer",
    ),
    pytest.param(
        lambda: _extra_consumer(1, as_output=True, activation="Relu"),
        "is also a graph output",
        {},
        id="conv-output-under-relu-is-graph-output",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[
                kernel_override((3, 3), pads=[0] * 4),
                kernel_override((3, 3), strides=[2, 2], pads=[2, 2, 2, 2]),
            ]
        ),
        "'strides' differs",
        {},
        id="strides-differ",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[
                kernel_override((3, 3), pads=[1] * 4),
                kernel_override((3, 3), pads=[0, 2, 2, 0]),
            ]
        ),
        "padding differs",
        {},
        id="pads-differ",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[
                kernel_override((3, 3), pads=[1] * 4),
                kernel_override((3, 3), auto_pad="SAME_LOWER"),
            ]
        ),
        "padding differs",
        {},
        id="auto-pad-differs-with-same-kernel",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[
                kernel_override((3, 3), pads=[0] * 4),
                kernel_override((3, 3), dilations=[2, 2], pads=[1] * 4),
            ]
        ),
        "not centred 'same' padding",
        {},
        id="dilations-differ-not-same-padding",
    ),
    pytest.param(
        lambda: block_model(overrides=[{"group": 1}, {"group": 2}]),
        "'group' differs",
        {},
        id="group-differs",
    ),
    pytest.param(
        lambda: block_model(overrides=[{}, {"out_per_branch": 6}]),
        "different output channel counts [4, 6]",
        {},
        id="output-channels-differ",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[kernel_override((3, 3), pads=[0] * 4), kernel_override((5, 5), pads=[1] * 4)]
        ),
        "not centred 'same' padding",
        {},
        id="mixconv-not-centred",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[
                kernel_override((2, 2), pads=[0, 0, 1, 1]),
                kernel_override((4, 4), pads=[1, 1, 2, 2]),
            ]
        ),
        "not centred 'same' padding",
        {},
        id="mixconv-even-kernels",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[
                kernel_override((3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
                kernel_override((5, 5), auto_pad="SAME_UPPER", strides=[2, 2]),
            ]
        ),
        "not centred 'same' padding",
        {},
        id="mixconv-same-upper-stride2",
    ),
    pytest.param(
        lambda: block_model(
            transpose=True,
            overrides=[
                kernel_override((3, 3), pads=[1] * 4),
                kernel_override((5, 5), pads=[2] * 4),
            ],
        ),
        "ConvTranspose kernels differ",
        {},
        id="convtranspose-kernels-differ",
    ),
    pytest.param(
        _mixed_conv_and_transpose,
        "mix Conv and ConvTranspose",
        {},
        id="mixed-conv-and-convtranspose",
    ),
    pytest.param(
        _concat_input_not_conv,
        "Concat input 1 is not produced by a Conv branch",
        {},
        id="concat-input-not-a-conv",
    ),
    pytest.param(
        _different_sources, "different tensors", {}, id="branches-split-different-tensors"
    ),
    pytest.param(
        _conv_on_graph_inputs, "not a channel Split or Slice", {}, id="conv-on-graph-inputs"
    ),
    pytest.param(_weight_graph_input, "is not a constant", {}, id="weight-is-graph-input"),
    pytest.param(
        lambda: _weight_graph_input(overridable=True),
        "is not a constant",
        {},
        id="weight-initializer-overridable-by-input",
    ),
    pytest.param(lambda: _weight_graph_input(which=2), "bias of", {}, id="bias-is-graph-input"),
    pytest.param(
        lambda: _computed_bounds("slice"),
        "Slice bounds are not constant",
        {},
        id="slice-bounds-from-input",
    ),
    pytest.param(
        lambda: _computed_bounds("split"),
        "split sizes are not constant",
        {},
        id="split-sizes-computed",
    ),
    pytest.param(
        lambda: block_model(form="slice", x_shape=SYMBOLIC_C),
        "channel dimension of 'X' is symbolic",
        {"shapes": SYMBOLIC_C_FEED},
        id="symbolic-channels-slices",
    ),
    pytest.param(
        lambda: block_model(form="equal", x_shape=SYMBOLIC_C),
        "channel dimension of 'X' is symbolic",
        {"shapes": SYMBOLIC_C_FEED},
        id="symbolic-channels-equal-split",
    ),
    pytest.param(
        lambda: block_model(form="split18", x_shape=SYMBOLIC_C),
        "channel dimension of 'X' is symbolic",
        {"shapes": SYMBOLIC_C_FEED},
        id="symbolic-channels-split18",
    ),
    pytest.param(
        lambda: block_model(overrides=[{"activation": "Relu"}, {"activation": "Sigmoid"}]),
        "different activations ['Relu', 'Sigmoid']",
        {},
        id="different-activations",
    ),
    pytest.param(
        lambda: block_model(overrides=[{"activation": "Relu"}, {}]),
        "different activations ['Relu', 'none']",
        {},
        id="activation-on-one-branch",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[
                {"activation": ("LeakyRelu", {"alpha": 0.1}, ())},
                {"activation": ("LeakyRelu", {"alpha": 0.2}, ())},
            ]
        ),
        "different activations",
        {},
        id="leaky-relu-alpha-differs",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[
                {"activation": ("Clip", {}, (np.float32(0), np.float32(6)))},
                {"activation": ("Clip", {}, (np.float32(0), np.float32(1)))},
            ]
        ),
        "different activations",
        {},
        id="clip-bounds-differ",
    ),
    pytest.param(
        _clip_bound_input,
        "activation parameter 'clip_max' is not constant",
        {},
        id="clip-bound-is-graph-input",
    ),
    pytest.param(
        lambda: block_model(overrides=[kernel_override((3, 3)), kernel_override((5, 5))]),
        "MixConv folding is off",
        {"mixconv": False},
        id="mixconv-option-off",
    ),
]


@pytest.mark.parametrize(("build", "reason", "options"), REFUSALS)
def test_refusals(build, reason, options, ort_equal):
    assert_refused(build(), reason, ort_equal, **options)


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        pytest.param(
            dict(channels=9, sizes=[3, 3, 3, 0], form="split18"),
            "zero-size split part",
            id="split18-c9-n4-last-part-empty",
        ),
        pytest.param(
            dict(channels=8, ranges=[(4, 4), (4, 4)], form="slice"),
            "branch 0: zero-size split part",
            id="empty-slices",
        ),
    ],
)
def test_zero_size_parts_are_refused(block, reason):
    """The ONNX checker accepts these models but onnxruntime 1.31 cannot run them: the Split
    fails ("Split size 3 exceeds the remaining size of the selected axis, 0") and a Conv with 0
    input channels never returns with optimisations off. So there are no outputs to compare."""
    assert_refused(block_model(**block), reason, None, run_ort=False)


def _batch_norm_training_mode() -> onnx.ModelProto:
    proto = block_model(batch_norm=True, opset=15)
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(helper.make_attribute("training_mode", 1))
            node.output.extend([f"{node.output[0]}_mean", f"{node.output[0]}_var"])
    return checked(proto)


def _batch_norm_param_input() -> onnx.ModelProto:
    proto = block_model(batch_norm=True)
    bn = producer_of(proto, branch_value(proto))
    bn.input[3] = "running_mean"
    proto.graph.input.append(tensor_info("running_mean", [4]))
    return checked(proto)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        pytest.param(
            _batch_norm_training_mode,
            "is in training mode",
            id="bn-training-mode",
        ),
        pytest.param(
            _batch_norm_param_input,
            "BatchNormalization parameters are not constant",
            id="bn-mean-is-graph-input",
        ),
    ],
)
def test_batch_norm_refusals(build, reason, ort_equal):
    assert_refused(build(), reason, ort_equal)


def test_concat_of_plain_values_is_not_a_candidate():
    """A Concat with no Conv branches is not a block at all: no skip is reported."""
    b = GraphBuilder()
    b.op("Concat", [b.op("Relu", ["X"]), b.op("Sigmoid", ["X"])], axis=1, out="Y")
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])
    result, fold_pass = run_fold(proto)
    assert result.modified is False and fold_pass.skips == [] and fold_pass.rewrites == []


def test_refused_block_next_to_folded_block(ort_equal):
    """One block folds, the other is refused; the report has one of each."""
    b = GraphBuilder()
    y = conv_block(b, "X", channels=8)
    conv_block(b, y, channels=8, concat_order=[1, 0], output="Y")
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])
    result, fold_pass = run_fold(proto)
    assert result.modified
    assert len(fold_pass.rewrites) == 1 and len(fold_pass.skips) == 1
    assert "Concat order" in fold_pass.skips[0].reason
    ort_equal(proto, result.model)
