"""Fold pass: MixConv kernels, gapped windows, and the other graph shapes a block comes in.

Each positive case checks the structure and onnxruntime outputs before against after. Models and checks come from ``builders`` (``block_model``, ``assert_folds``, ``assert_refused``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import (
    GraphBuilder,
    any_tensor,
    assert_folds,
    assert_one_conv,
    block_model,
    checked,
    conv_block,
    dead_initializers,
    kernel_override,
    run_fold,
    tensor_info,
)
from gconv_compile.passes._common import const_array
from onnx import TensorProto, helper

MIXCONV = [
    pytest.param(
        dict(overrides=[kernel_override((3, 3)), kernel_override((5, 5))]),
        [8, 4, 5, 5],
        [1, 1],
        id="3x3-5x5",
    ),
    pytest.param(
        dict(
            overrides=[
                kernel_override((3, 3), strides=[2, 2], pads=[1] * 4),
                kernel_override((5, 5), strides=[2, 2], pads=[2] * 4),
            ]
        ),
        [8, 4, 5, 5],
        [1, 1],
        id="3x3-5x5-stride2",
    ),
    pytest.param(
        dict(
            overrides=[
                kernel_override((3, 3), dilations=[2, 2], pads=[2] * 4),
                kernel_override((5, 5)),
            ]
        ),
        [8, 4, 5, 5],
        [1, 1],
        id="3x3-dilation2-vs-5x5",
    ),
    pytest.param(
        dict(
            overrides=[
                kernel_override((3, 3), dilations=[2, 2], pads=[2] * 4),
                kernel_override((5, 5), dilations=[2, 2], pads=[4] * 4),
            ]
        ),
        [8, 4, 5, 5],
        [2, 2],
        id="3x3-5x5-both-dilation2",
    ),
    pytest.param(
        dict(
            overrides=[
                kernel_override((3, 3)),
                kernel_override((3, 3), dilations=[2, 2], pads=[2] * 4),
            ]
        ),
        [8, 4, 5, 5],
        [1, 1],
        id="3x3-vs-3x3-dilation2",
    ),
    pytest.param(
        dict(
            channels=12,
            n=3,
            overrides=[kernel_override((3, 3)), kernel_override((5, 5)), kernel_override((7, 7))],
        ),
        [12, 4, 7, 7],
        [1, 1],
        id="3x3-5x5-7x7",
    ),
    pytest.param(
        dict(overrides=[kernel_override((1, 3)), kernel_override((3, 1))]),
        [8, 4, 3, 3],
        [1, 1],
        id="1x3-3x1",
    ),
    pytest.param(
        dict(
            overrides=[
                kernel_override((3, 3), auto_pad="SAME_UPPER"),
                kernel_override((5, 5), auto_pad="SAME_UPPER"),
            ]
        ),
        [8, 4, 5, 5],
        [1, 1],
        id="same-upper-stride1",
    ),
    pytest.param(
        dict(overrides=[kernel_override((3,)), kernel_override((5,))], kernel=(3,)),
        [8, 4, 5],
        [1],
        id="conv1d-3-5",
    ),
    pytest.param(
        dict(
            overrides=[kernel_override((3, 3)), kernel_override((5, 5))],
            batch_norm=True,
            activation="Relu",
            form="slice",
        ),
        [8, 4, 5, 5],
        [1, 1],
        id="3x3-5x5-bn-relu-slices",
    ),
    pytest.param(
        dict(overrides=[kernel_override((3, 3)), kernel_override((5, 5))], group=2),
        [8, 2, 5, 5],
        [1, 1],
        id="3x3-5x5-grouped-branches",
    ),
]


@pytest.mark.parametrize(("block", "weight_shape", "dilations"), MIXCONV)
def test_mixconv(block, weight_shape, dilations, ort_equal):
    """The embedding itself: folded with mixconv="always" (the cost decision has its own tests
    in test_passes_fold_cost.py)."""
    proto = block_model(**block)
    group = block.get("n", 2) * block.get("group", 1)
    _, fold_pass, conv = assert_folds(
        proto, ort_equal, group=group, weight_shape=weight_shape,
        activation=block.get("activation"), mixconv="always",
    )  # fmt: skip
    kernel = weight_shape[2:]
    assert list(conv.attributes["kernel_shape"].as_ints()) == kernel
    assert list(conv.attributes["dilations"].as_ints()) == dilations
    assert "auto_pad" not in conv.attributes
    assert any(note.startswith("MixConv") for note in fold_pass.rewrites[0].details["notes"])


GAPPED = [
    pytest.param(dict(channels=12, ranges=[(4, 8), (8, 12)]), (4, 12), id="gap-at-start"),
    pytest.param(dict(channels=12, ranges=[(0, 4), (4, 8)]), (0, 8), id="gap-at-end"),
    pytest.param(dict(channels=12, ranges=[(2, 6), (6, 10)]), (2, 10), id="gap-both-ends"),
    pytest.param(
        dict(channels=12, ranges=[(2, 6), (6, 10)], form="slice_negative"),
        (2, 10),
        id="gap-negative-bounds",
    ),
    pytest.param(
        dict(
            channels=12,
            ranges=[(2, 6), (6, 10)],
            form="slice_node",
            batch_norm=True,
            activation="Relu",
        ),
        (2, 10),
        id="gap-bn-relu",
    ),
]


@pytest.mark.parametrize(("block", "window"), GAPPED)
def test_gapped_slices(block, window, ort_equal):
    block.setdefault("form", "slice")
    proto = block_model(**block)
    _, fold_pass, conv = assert_folds(
        proto, ort_equal, group=2, weight_shape=[8, 4, 3, 3], activation=block.get("activation")
    )
    _assert_window(conv, window)
    assert any("gapped split" in note for note in fold_pass.rewrites[0].details["notes"])


def _assert_window(conv: ir.Node, window: tuple[int, int]) -> None:
    window_slice = conv.inputs[0].producer()
    assert window_slice.op_type == "Slice"
    assert window_slice.inputs[0].name == "X"
    bounds = [int(const_array(v)[0]) for v in window_slice.inputs[1:5]]
    assert bounds == [window[0], window[1], 1, 1]


def test_split_with_unused_output_keeps_window(ort_equal):
    """Split into three, only two parts convolved: the grouped Conv reads channels [0, 8)."""
    b = GraphBuilder()
    x0, x1, _ = b.split("X", [4, 4, 4], form="split13")
    c0 = b.conv(x0, 4, 4, (3, 3), pads=[1] * 4)
    c1 = b.conv(x1, 4, 4, (3, 3), pads=[1] * 4)
    b.op("Concat", [c0, c1], axis=1, out="Y")
    proto = b.model([tensor_info("X", ["N", 12, 7, 6])], [any_tensor("Y")])
    _, _, conv = assert_folds(proto, ort_equal, group=2, weight_shape=[8, 4, 3, 3])
    _assert_window(conv, (0, 8))


def test_split_with_unused_part_of_another_size_keeps_window(ort_equal):
    """Split [1, 4, 4], the two 4-channel parts convolved: only the used parts must be equal."""
    b = GraphBuilder()
    _, x1, x2 = b.split("X", [1, 4, 4], form="split13")
    c1 = b.conv(x1, 4, 4, (3, 3), pads=[1] * 4)
    c2 = b.conv(x2, 4, 4, (3, 3), pads=[1] * 4)
    b.op("Concat", [c1, c2], axis=1, out="Y")
    proto = b.model([tensor_info("X", ["N", 9, 7, 6])], [any_tensor("Y")])
    _, _, conv = assert_folds(proto, ort_equal, group=2, weight_shape=[8, 4, 3, 3])
    _assert_window(conv, (1, 9))


def _explicit_step_slices() -> onnx.ModelProto:
    b = GraphBuilder()
    parts = [b.slice("X", lo, lo + 4, step=1) for lo in (0, 4)]
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in parts]
    b.op("Concat", outs, axis=1, out="Y")
    return b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])


def _split_negative_axis() -> onnx.ModelProto:
    b = GraphBuilder()
    parts = b.split("X", [4, 4], form="split13", axis=-3)
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in parts]
    b.op("Concat", outs, axis=1, out="Y")
    return b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])


def _split_and_slice_mixed() -> onnx.ModelProto:
    """Branch 0 from a Split, branch 1 from a Slice of the same tensor."""
    b = GraphBuilder()
    first, _ = b.split("X", [4, 4], form="split13")
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in (first, b.slice("X", 4, 8))]
    b.op("Concat", outs, axis=1, out="Y")
    return b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])


def _float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float16: inputs, outputs and every float initializer."""
    for tensor in proto.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            array = onnx.numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return checked(proto)


OTHER_FORMS = [
    pytest.param(_explicit_step_slices, 2, [8, 4, 3, 3], None, id="slice-explicit-step-1"),
    pytest.param(_split_negative_axis, 2, [8, 4, 3, 3], None, id="split-axis-minus-3"),
    pytest.param(_split_and_slice_mixed, 2, [8, 4, 3, 3], None, id="split-and-slice-mixed"),
    pytest.param(
        lambda: _float16(
            block_model(overrides=[kernel_override((3, 3)), kernel_override((5, 5))], form="slice")
        ),
        2,
        [8, 4, 5, 5],
        None,
        id="float16-mixconv",
    ),
]


@pytest.mark.parametrize(("build", "group", "weight_shape", "activation"), OTHER_FORMS)
def test_other_forms(build, group, weight_shape, activation, ort_equal):
    model, _, conv = assert_folds(
        build(), ort_equal, group=group, weight_shape=weight_shape, activation=activation
    )
    assert conv.inputs[1].dtype == model.graph.inputs[0].dtype


def test_float16_batch_norm_fold(ort_equal):
    """float16 with BN: folding changes where fp16 rounds, by about one ulp of the pre-BN value
    (outputs reach ~26, one ulp there is 0.016). Measured against a float32 run, the folded
    model is as close as the original (max error 0.019 vs 0.021), so the tolerance is one ulp
    of |y| < 32; a wrong fold is off by whole units."""
    proto = _float16(block_model(batch_norm=True, activation="Relu"))
    assert_folds(
        proto,
        ort_equal,
        group=2,
        weight_shape=[8, 4, 3, 3],
        activation="Relu",
        tolerance=(2**-6, 1e-2),
    )


def test_two_blocks_share_one_split(ort_equal):
    """Split(X) in four; parts 0-1 and 2-3 feed two blocks: each keeps its window by a Slice."""
    b = GraphBuilder()
    parts = b.split("X", [4] * 4, form="split13")
    for pair, name in ((parts[:2], "Y"), (parts[2:], "Z")):
        outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in pair]
        b.op("Concat", outs, axis=1, out=name)
    proto = b.model([tensor_info("X", ["N", 16, 7, 6])], [any_tensor("Y"), any_tensor("Z")])
    result, fold_pass = run_fold(proto)
    assert result.modified and len(fold_pass.rewrites) == 2
    ops = [n.op_type for n in result.model.graph]
    assert sorted(ops) == ["Conv", "Conv", "Slice", "Slice"]
    for output, window in (("Y", (0, 8)), ("Z", (8, 16))):
        conv = next(v for v in result.model.graph.outputs if v.name == output).producer()
        assert conv.attributes["group"].as_int() == 2
        _assert_window(conv, window)
    assert not dead_initializers(result.model.graph)
    ort_equal(proto, result.model)


def test_slices_with_attributes_opset9(ort_equal):
    """Before opset 10, Slice bounds were attributes."""
    b = GraphBuilder()
    parts = [b.op("Slice", ["X"], starts=[lo], ends=[lo + 4], axes=[1]) for lo in (0, 4)]
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in parts]
    b.op("Concat", outs, axis=1, out="Y")
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")], opset=9)
    assert_folds(proto, ort_equal, group=2, weight_shape=[8, 4, 3, 3])


def test_branch_weight_also_used_outside_the_block(ort_equal):
    """The branch weight stays: a Conv outside the block still reads it."""
    b = GraphBuilder()
    y = conv_block(b, "X", channels=8, output="Y")
    weight = next(n for n in b.nodes if n.op_type == "Conv").input[1]  # [4, 4, 3, 3]
    b.nodes.append(helper.make_node("Conv", [y, weight], ["Z"], name="outside", group=2))
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y"), any_tensor("Z")])
    result, _ = run_fold(proto)
    assert result.modified
    assert weight in result.model.graph.initializers
    (outside,) = [n for n in result.model.graph if n.name == "outside"]
    assert outside.inputs[1].name == weight and outside.inputs[0].name == y
    ort_equal(proto, result.model)


def test_concat_output_feeds_further_nodes(ort_equal):
    """Y stays a graph output and also feeds Z = Sigmoid(Y) and W = Relu(Y * m)."""
    b = GraphBuilder()
    y = conv_block(b, "X", channels=8, output="Y")
    b.op("Sigmoid", [y], out="Z")
    b.op("Relu", [b.op("Mul", [y, b.random((1, 8, 1, 1))])], out="W")
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor(n) for n in ("Y", "Z", "W")])
    model, _, conv = assert_folds(proto, ort_equal, group=2, weight_shape=[8, 4, 3, 3])
    users = sorted(use.node.op_type for use in conv.outputs[0].uses())
    assert users == ["Mul", "Sigmoid"]
    assert [v.name for v in model.graph.outputs] == ["Y", "Z", "W"]


def test_concat_output_only_feeds_further_nodes(ort_equal):
    b = GraphBuilder()
    y = conv_block(b, "X", channels=8, activation="Relu")
    b.op("Sigmoid", [y], out="Z")
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Z")])
    result, fold_pass = run_fold(proto)
    assert result.modified
    conv = assert_one_conv(result.model.graph, group=2, weight_shape=[8, 4, 3, 3], output=None)
    (relu_use,) = conv.outputs[0].uses()
    assert relu_use.node.op_type == "Relu"
    assert [u.node.op_type for u in relu_use.node.outputs[0].uses()] == ["Sigmoid"]
    ort_equal(proto, result.model)


def test_split_output_with_another_consumer_is_kept(ort_equal):
    b = GraphBuilder()
    parts = b.split("X", [4, 4], form="split13")
    outs = [b.conv(p, 4, 4, (3, 3), pads=[1] * 4) for p in parts]
    b.op("Concat", outs, axis=1, out="Y")
    b.op("Relu", [parts[1]], out="Z")
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y"), any_tensor("Z")])
    result, _ = run_fold(proto)
    assert result.modified
    assert_one_conv(result.model.graph, group=2, weight_shape=[8, 4, 3, 3], keep=("Split",))
    (split,) = [n for n in result.model.graph if n.op_type == "Split"]
    assert [u.node.op_type for u in split.outputs[1].uses()] == ["Relu"]
    assert not split.outputs[0].uses()
    ort_equal(proto, result.model)


def test_two_blocks_in_one_graph(ort_equal):
    b = GraphBuilder()
    y = conv_block(b, "X", channels=8, batch_norm=True, activation="Relu")
    conv_block(
        b,
        y,
        channels=8,
        form="slice",
        overrides=[kernel_override((3, 3)), kernel_override((5, 5))],
        output="Y",
    )
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])
    result, fold_pass = run_fold(proto)
    assert result.modified and len(fold_pass.rewrites) == 2
    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    assert [c.attributes["group"].as_int() for c in convs] == [2, 2]
    ort_equal(proto, result.model)


def test_nested_split_conv_concat(ort_equal):
    """Split(X) -> [Split -> 2 x Conv -> Concat] x 2 -> Concat folds to one Conv(group=4)."""
    b = GraphBuilder()
    halves = b.split("X", [8, 8], form="split13")
    inner = [
        conv_block(b, h, channels=8, n=2, form=f) for h, f in zip(halves, ("split18", "slice"))
    ]
    b.op("Concat", inner, axis=1, out="Y")
    proto = b.model([tensor_info("X", ["N", 16, 7, 6])], [any_tensor("Y")], opset=18)
    _, fold_pass, _ = assert_folds(
        proto, ort_equal, group=4, weight_shape=[16, 4, 3, 3], rewrites=3
    )
    assert [r.details["group"] for r in fold_pass.rewrites] == [2, 2, 4]
