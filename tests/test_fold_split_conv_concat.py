"""Tests for passes.fold_split_conv_concat: every form the fold handles, and every refusal.

Positive cases check the structure (one Conv/ConvTranspose with the right ``group`` and weight
shape, no Split/Concat left, the result under the original output name) and the numbers
(onnxruntime on the model serialised before the pass against the model after). Negative cases
check ``modified is False``, the reason, a byte-identical model and unchanged outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import (
    INT64_MAX,
    GraphBuilder,
    any_tensor,
    conv_block,
    tensor_info,
)
from gconv_compile.passes import FoldSplitConvConcat
from gconv_compile.passes._common import const_array
from onnx import TensorProto, helper

import gconv_compile
from gconv_compile.model_io import save_model

CONV_OPS = ("Conv", "ConvTranspose")


# ------------------------------------------------------------------------------ helpers


def block_model(*, channels=8, spatial=None, batch="N", opset=None, seed=0, x_shape=None, **block):
    """X -> conv_block(...) -> Y as a model; the opset follows the split form unless given."""
    b = GraphBuilder(seed)
    conv_block(b, "X", channels=channels, output="Y", **block)
    rank = len(block.get("kernel", (3, 3)))
    spatial = spatial or (7, 6, 5)[:rank]
    opset = opset or {"split11": 11, "split18": 18}.get(block.get("form", "split13"), 17)
    shape = x_shape or [batch, channels, *spatial]
    return b.model([tensor_info("X", shape)], [any_tensor("Y", len(shape))], opset=opset)


def run_fold(proto: onnx.ModelProto, **options) -> tuple[ir.passes.PassResult, FoldSplitConvConcat]:
    model = ir.serde.deserialize_model(proto)
    fold_pass = FoldSplitConvConcat(**options)
    return fold_pass(model), fold_pass


def serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def assert_one_conv(
    graph, *, group, weight_shape, op="Conv", output="Y", activation=None, keep=()
) -> ir.Node:
    """The graph holds exactly one Conv/ConvTranspose, folded as expected, feeding ``output``."""
    ops = [node.op_type for node in graph]
    convs = [node for node in graph if node.op_type in CONV_OPS]
    assert [c.op_type for c in convs] == [op], ops
    for gone in ("Split", "Concat"):
        if gone not in keep:
            assert gone not in ops, ops
    conv = convs[0]
    assert conv.attributes["group"].as_int() == group
    assert not dead_initializers(graph)
    weight = const_array(conv.inputs[1])
    assert weight is not None and list(weight.shape) == list(weight_shape)
    if output is not None:
        (out,) = [v for v in graph.outputs if v.name == output]
        producer = out.producer()
        if activation is None:
            assert producer is conv
        else:
            assert producer.op_type == activation
            assert producer.inputs[0].producer() is conv
    return conv


def assert_folds(
    proto,
    ort_equal,
    *,
    group,
    weight_shape,
    op="Conv",
    activation=None,
    shapes=None,
    tolerance=(None, None),
    rewrites=1,
    **options,
) -> tuple[ir.Model, FoldSplitConvConcat, ir.Node]:
    """Run the pass; check modified, structure, checker validity and onnxruntime numbers."""
    result, fold_pass = run_fold(proto, **options)
    assert result.modified is True, [s.reason for s in fold_pass.skips]
    assert len(fold_pass.rewrites) == rewrites
    assert fold_pass.rewrites[-1].details["group"] == group
    conv = assert_one_conv(
        result.model.graph, group=group, weight_shape=weight_shape, op=op, activation=activation
    )
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    ort_equal(proto, result.model, shapes=shapes, atol=tolerance[0], rtol=tolerance[1])
    return result.model, fold_pass, conv


def assert_refused(proto, reason, ort_equal, *, run_ort=True, shapes=None, **options) -> None:
    """The pass leaves the model byte-identical, says why, and outputs are unchanged."""
    untouched = serialized(ir.serde.deserialize_model(proto))
    result, fold_pass = run_fold(proto, **options)
    assert result.modified is False
    assert fold_pass.rewrites == []
    reasons = [skip.reason for skip in fold_pass.skips]
    assert len(reasons) == 1 and reason in reasons[0], reasons
    assert serialized(result.model) == untouched
    if run_ort:
        ort_equal(proto, result.model, shapes=shapes)


def dead_initializers(graph) -> list[str]:
    return [
        name
        for name, value in graph.initializers.items()
        if not value.uses() and not value.is_graph_output()
    ]


def concat_node(proto: onnx.ModelProto) -> onnx.NodeProto:
    return [n for n in proto.graph.node if n.op_type == "Concat"][-1]


def producer_of(proto: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if name in n.output)


def branch_value(proto: onnx.ModelProto, steps_back: int = 0, branch: int = 0) -> str:
    """A value inside a branch: the Concat input, or ``steps_back`` producers above it."""
    name = concat_node(proto).input[branch]
    for _ in range(steps_back):
        name = producer_of(proto, name).input[0]
    return name


def checked(proto: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(proto)
    return proto


# ------------------------------------------------------------------------ positive cases

# X with a symbolic channel dim, and the sizes onnxruntime runs it with.
SYMBOLIC_C = ["N", "C", 7, 6]
SYMBOLIC_C_FEED = {"X": [2, 8, 7, 6]}

SPLIT_FORMS = [
    pytest.param(dict(form="split11"), 2, [8, 4, 3, 3], id="split11-attribute"),
    pytest.param(dict(form="split13"), 2, [8, 4, 3, 3], id="split13-input"),
    pytest.param(dict(form="split18"), 2, [8, 4, 3, 3], id="split18-num_outputs"),
    pytest.param(dict(form="split18", channels=12, n=3), 3, [12, 4, 3, 3], id="split18-three-way"),
    pytest.param(dict(form="equal", opset=13), 2, [8, 4, 3, 3], id="split-no-sizes-opset13"),
    pytest.param(dict(form="equal", opset=11), 2, [8, 4, 3, 3], id="split-no-sizes-opset11"),
    pytest.param(
        dict(form="split13", x_shape=SYMBOLIC_C, shapes=SYMBOLIC_C_FEED),
        2,
        [8, 4, 3, 3],
        id="split13-symbolic-channels",
    ),
    pytest.param(
        dict(form="split11", x_shape=SYMBOLIC_C, shapes=SYMBOLIC_C_FEED),
        2,
        [8, 4, 3, 3],
        id="split11-symbolic-channels",
    ),
    pytest.param(dict(form="slice"), 2, [8, 4, 3, 3], id="slice-initializer-bounds"),
    pytest.param(dict(form="slice_node"), 2, [8, 4, 3, 3], id="slice-constant-node-bounds"),
    pytest.param(
        dict(form="slice_negative", channels=12, n=3),
        3,
        [12, 4, 3, 3],
        id="slice-negative-axis-bounds-int64max",
    ),
    pytest.param(
        dict(form="slice_negative", kernel=(3,)), 2, [8, 4, 3], id="slice-negative-axis-conv1d"
    ),
    pytest.param(dict(form="chunk"), 2, [8, 4, 3, 3], id="slice-chunk-shape-arithmetic"),
    pytest.param(
        dict(form="chunk", channels=12, n=3, spatial=("H", "W")),
        3,
        [12, 4, 3, 3],
        id="slice-chunk-symbolic-spatial",
    ),
]


@pytest.mark.parametrize(("block", "group", "weight_shape"), SPLIT_FORMS)
def test_split_forms(block, group, weight_shape, ort_equal):
    block = dict(block)
    shapes = block.pop("shapes", None)
    proto = block_model(**block)
    _, fold_pass, _ = assert_folds(
        proto, ort_equal, group=group, weight_shape=weight_shape, shapes=shapes
    )
    splitter = "Slice" if block["form"].startswith("slice") or block["form"] == "chunk" else "Split"
    assert fold_pass.rewrites[0].details["split_by"] == [splitter]


CONV_VARIANTS = [
    pytest.param(dict(kernel=(3,)), [8, 4, 3], id="conv1d"),
    pytest.param(dict(kernel=(3, 3, 3)), [8, 4, 3, 3, 3], id="conv3d"),
    pytest.param(dict(kernel=(1, 1)), [8, 4, 1, 1], id="pointwise-1x1"),
    pytest.param(
        dict(kernel=(1, 3), conv_attrs={"pads": [0, 1, 0, 1]}),
        [8, 4, 1, 3],
        id="rectangular-kernel",
    ),
    pytest.param(
        dict(conv_attrs={"strides": [2, 2], "pads": [1, 1, 1, 1]}), [8, 4, 3, 3], id="strides-2"
    ),
    pytest.param(
        dict(conv_attrs={"strides": [2, 1], "pads": [0, 1, 2, 0]}),
        [8, 4, 3, 3],
        id="asymmetric-pads-strides",
    ),
    pytest.param(
        dict(conv_attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        [8, 4, 3, 3],
        id="auto-pad-same-upper-stride2",
    ),
    pytest.param(
        dict(kernel=(2, 2), conv_attrs={"auto_pad": "SAME_LOWER"}),
        [8, 4, 2, 2],
        id="auto-pad-same-lower-even-kernel",
    ),
    pytest.param(dict(conv_attrs={"auto_pad": "VALID"}), [8, 4, 3, 3], id="auto-pad-valid"),
    pytest.param(
        dict(conv_attrs={"dilations": [2, 2], "pads": [2, 2, 2, 2]}), [8, 4, 3, 3], id="dilations-2"
    ),
    pytest.param(
        dict(conv_attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
        [8, 4, 3, 3],
        id="kernel-shape-attribute",
    ),
    pytest.param(dict(bias=False), [8, 4, 3, 3], id="no-bias"),
    pytest.param(
        dict(channels=12, n=3, overrides=[{"bias": False}, {}, {"bias": False}]),
        [12, 4, 3, 3],
        id="mixed-bias",
    ),
    pytest.param(dict(as_node=True), [8, 4, 3, 3], id="weights-constant-nodes"),
    pytest.param(dict(shared_weight=True), [8, 4, 3, 3], id="same-weight-every-branch"),
    pytest.param(dict(channels=16, n=4, out_per_branch=8), [32, 4, 3, 3], id="four-branches"),
    pytest.param(dict(spatial=("H", "W")), [8, 4, 3, 3], id="symbolic-batch-and-spatial"),
    pytest.param(dict(form="slice", spatial=("H", "W")), [8, 4, 3, 3], id="slice-symbolic-spatial"),
    pytest.param(dict(concat_axis=-3), [8, 4, 3, 3], id="concat-axis-minus-3"),
    pytest.param(dict(concat_axis=-2, kernel=(3,)), [8, 4, 3], id="concat-axis-minus-2-conv1d"),
]


@pytest.mark.parametrize(("block", "weight_shape"), CONV_VARIANTS)
def test_conv_variants(block, weight_shape, ort_equal):
    n = block.get("n", 2)
    proto = block_model(**block)
    _, _, conv = assert_folds(proto, ort_equal, group=n, weight_shape=weight_shape)
    assert (len(conv.inputs) > 2) == block.get("bias", True)


def test_shared_weight_initializer_is_dropped(ort_equal):
    proto = block_model(shared_weight=True)
    assert len([i for i in proto.graph.initializer if i.name.startswith("w_shared")]) == 1
    model, _, _ = assert_folds(proto, ort_equal, group=2, weight_shape=[8, 4, 3, 3])
    assert not [name for name in model.graph.initializers if name.startswith("w_shared")]


BN_AND_ACTIVATIONS = [
    pytest.param(dict(batch_norm=True), None, id="batch-norm"),
    pytest.param(dict(batch_norm=True, bias=False), None, id="batch-norm-no-bias"),
    pytest.param(dict(batch_norm=True, as_node=True), None, id="batch-norm-constant-nodes"),
    *[
        pytest.param(dict(activation=name), name, id=f"activation-{name}")
        for name in (
            "Relu",
            "LeakyRelu",
            "Sigmoid",
            "Tanh",
            "Clip",
            "HardSwish",
            "HardSigmoid",
            "Elu",
            "Softplus",
        )
    ],
    pytest.param(dict(activation=("Clip", {}, (np.float32(-0.25),))), "Clip", id="clip-min-only"),
    pytest.param(
        dict(activation=("Clip", {}, (np.float32(-0.5), np.float32(0.5))), as_node=True),
        "Clip",
        id="clip-bounds-constant-nodes",
    ),
    pytest.param(dict(batch_norm=True, activation="Relu"), "Relu", id="batch-norm-relu"),
    pytest.param(
        dict(
            batch_norm=True,
            activation="LeakyRelu",
            channels=12,
            n=3,
            overrides=[{}, {"bias": False}, {}],
        ),
        "LeakyRelu",
        id="batch-norm-leaky-relu-mixed-bias",
    ),
    pytest.param(
        dict(batch_norm=True, activation="Clip", form="slice"), "Clip", id="batch-norm-clip-slices"
    ),
]


@pytest.mark.parametrize(("block", "activation"), BN_AND_ACTIVATIONS)
def test_batch_norm_and_activations(block, activation, ort_equal):
    n = block.get("n", 2)
    proto = block_model(**block)
    model, fold_pass, _ = assert_folds(
        proto, ort_equal, group=n, weight_shape=[4 * n, 4, 3, 3], activation=activation
    )
    ops = [node.op_type for node in model.graph]
    assert "BatchNormalization" not in ops
    if activation is not None:
        assert ops.count(activation) == 1
    notes = fold_pass.rewrites[0].details["notes"]
    assert ("BatchNormalization folded" in notes) == bool(block.get("batch_norm"))


GROUPED_BRANCHES = [
    pytest.param(dict(channels=12, n=3, group=2), 6, [12, 2, 3, 3], id="g2-x3-branches"),
    pytest.param(
        dict(channels=8, n=2, group=4, out_per_branch=8),
        8,
        [16, 1, 3, 3],
        id="depthwise-multiplier-2",
    ),
    pytest.param(
        dict(channels=8, n=2, group=4, out_per_branch=4, batch_norm=True, activation="Relu"),
        8,
        [8, 1, 3, 3],
        id="depthwise-bn-relu",
    ),
    pytest.param(
        dict(channels=12, n=3, group=2, form="slice", kernel=(3,)),
        6,
        [12, 2, 3],
        id="g2-x3-slices-conv1d",
    ),
]


@pytest.mark.parametrize(("block", "group", "weight_shape"), GROUPED_BRANCHES)
def test_grouped_branches(block, group, weight_shape, ort_equal):
    proto = block_model(**block)
    activation = block.get("activation")
    assert_folds(proto, ort_equal, group=group, weight_shape=weight_shape, activation=activation)


CONV_TRANSPOSE = [
    pytest.param(dict(), 2, [8, 4, 3, 3], id="convtranspose"),
    pytest.param(
        dict(conv_attrs={"strides": [2, 2], "output_shape": [14, 12]}),
        2,
        [8, 4, 3, 3],
        id="convtranspose-output-shape",
    ),
    pytest.param(dict(bias=False), 2, [8, 4, 3, 3], id="convtranspose-no-bias"),
    pytest.param(
        dict(channels=12, n=3, overrides=[{}, {"bias": False}, {}]),
        3,
        [12, 4, 3, 3],
        id="convtranspose-mixed-bias",
    ),
    pytest.param(dict(batch_norm=True), 2, [8, 4, 3, 3], id="convtranspose-bn"),
    pytest.param(
        dict(batch_norm=True, activation="Relu"), 2, [8, 4, 3, 3], id="convtranspose-bn-relu"
    ),
    pytest.param(
        dict(conv_attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}),
        2,
        [8, 4, 3, 3],
        id="convtranspose-stride2-output-padding",
    ),
    pytest.param(
        dict(group=2, out_per_branch=6, batch_norm=True),
        4,
        [8, 3, 3, 3],
        id="convtranspose-grouped-bn",
    ),
    pytest.param(
        dict(
            group=2,
            out_per_branch=6,
            channels=12,
            n=3,
            batch_norm=True,
            overrides=[{"bias": False}, {}, {}],
        ),
        6,
        [12, 3, 3, 3],
        id="convtranspose-grouped-bn-mixed-bias",
    ),
    pytest.param(
        dict(kernel=(4,), conv_attrs={"strides": [2]}, form="slice"),
        2,
        [8, 4, 4],
        id="convtranspose-1d-slices",
    ),
]


@pytest.mark.parametrize(("block", "group", "weight_shape"), CONV_TRANSPOSE)
def test_conv_transpose(block, group, weight_shape, ort_equal):
    proto = block_model(transpose=True, **block)
    activation = block.get("activation")
    assert_folds(
        proto,
        ort_equal,
        group=group,
        weight_shape=weight_shape,
        op="ConvTranspose",
        activation=activation,
    )


def _k(kernel, **attrs):
    return {"kernel": kernel, "conv_attrs": attrs or None}


MIXCONV = [
    pytest.param(dict(overrides=[_k((3, 3)), _k((5, 5))]), [8, 4, 5, 5], [1, 1], id="3x3-5x5"),
    pytest.param(
        dict(
            overrides=[
                _k((3, 3), strides=[2, 2], pads=[1] * 4),
                _k((5, 5), strides=[2, 2], pads=[2] * 4),
            ]
        ),
        [8, 4, 5, 5],
        [1, 1],
        id="3x3-5x5-stride2",
    ),
    pytest.param(
        dict(overrides=[_k((3, 3), dilations=[2, 2], pads=[2] * 4), _k((5, 5))]),
        [8, 4, 5, 5],
        [1, 1],
        id="3x3-dilation2-vs-5x5",
    ),
    pytest.param(
        dict(
            overrides=[
                _k((3, 3), dilations=[2, 2], pads=[2] * 4),
                _k((5, 5), dilations=[2, 2], pads=[4] * 4),
            ]
        ),
        [8, 4, 5, 5],
        [2, 2],
        id="3x3-5x5-both-dilation2",
    ),
    pytest.param(
        dict(overrides=[_k((3, 3)), _k((3, 3), dilations=[2, 2], pads=[2] * 4)]),
        [8, 4, 5, 5],
        [1, 1],
        id="3x3-vs-3x3-dilation2",
    ),
    pytest.param(
        dict(channels=12, n=3, overrides=[_k((3, 3)), _k((5, 5)), _k((7, 7))]),
        [12, 4, 7, 7],
        [1, 1],
        id="3x3-5x5-7x7",
    ),
    pytest.param(dict(overrides=[_k((1, 3)), _k((3, 1))]), [8, 4, 3, 3], [1, 1], id="1x3-3x1"),
    pytest.param(
        dict(overrides=[_k((3, 3), auto_pad="SAME_UPPER"), _k((5, 5), auto_pad="SAME_UPPER")]),
        [8, 4, 5, 5],
        [1, 1],
        id="same-upper-stride1",
    ),
    pytest.param(
        dict(overrides=[_k((3,)), _k((5,))], kernel=(3,)), [8, 4, 5], [1], id="conv1d-3-5"
    ),
    pytest.param(
        dict(overrides=[_k((3, 3)), _k((5, 5))], batch_norm=True, activation="Relu", form="slice"),
        [8, 4, 5, 5],
        [1, 1],
        id="3x3-5x5-bn-relu-slices",
    ),
    pytest.param(
        dict(overrides=[_k((3, 3)), _k((5, 5))], group=2),
        [8, 2, 5, 5],
        [1, 1],
        id="3x3-5x5-grouped-branches",
    ),
]


@pytest.mark.parametrize(("block", "weight_shape", "dilations"), MIXCONV)
def test_mixconv(block, weight_shape, dilations, ort_equal):
    proto = block_model(**block)
    group = block.get("n", 2) * block.get("group", 1)
    _, fold_pass, conv = assert_folds(
        proto, ort_equal, group=group, weight_shape=weight_shape, activation=block.get("activation")
    )
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
        lambda: _float16(block_model(overrides=[_k((3, 3)), _k((5, 5))], form="slice")),
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
    conv_block(b, y, channels=8, form="slice", overrides=[_k((3, 3)), _k((5, 5))], output="Y")
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


# --------------------------------------------------------------- subgraphs and functions


def test_block_inside_if_branches(ort_equal):
    """Both If branches hold a block on the outer X, one with outer-scope weights."""
    b = GraphBuilder()
    then_b, else_b = b.child(), b.child()
    conv_block(
        then_b, "X", channels=8, batch_norm=True, activation="Relu", consts=b, output="then_Y"
    )
    conv_block(else_b, "X", channels=8, form="slice", output="else_Y")
    then_graph = then_b.graph([], [any_tensor("then_Y")], "then_branch")
    else_graph = else_b.graph([], [any_tensor("else_Y")], "else_branch")
    b.nodes.append(
        helper.make_node(
            "If", ["cond"], ["Y"], then_branch=then_graph, else_branch=else_graph, name="if"
        )
    )
    inputs = [tensor_info("X", ["N", 8, 7, 6]), tensor_info("cond", [], TensorProto.BOOL)]
    proto = b.model(inputs, [any_tensor("Y")])
    result, fold_pass = run_fold(proto)
    assert result.modified and len(fold_pass.rewrites) == 2
    (if_node,) = list(result.model.graph)
    then_g = if_node.attributes["then_branch"].as_graph()
    else_g = if_node.attributes["else_branch"].as_graph()
    assert_one_conv(then_g, group=2, weight_shape=[8, 4, 3, 3], output="then_Y", activation="Relu")
    assert_one_conv(else_g, group=2, weight_shape=[8, 4, 3, 3], output="else_Y")
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    x = np.random.default_rng(3).standard_normal((2, 8, 7, 6)).astype(np.float32)
    feeds = [{"X": x, "cond": np.array(flag)} for flag in (True, False)]
    ort_equal(proto, result.model, feeds=feeds)


def test_block_inside_loop_body(ort_equal):
    """A Loop applies the block twice to its carried value; weights are outer-scope values."""
    b = GraphBuilder()
    body = b.child()
    body.op("Identity", ["cond_in"], out="cond_out")
    conv_block(body, "v_in", channels=8, form="slice", consts=b, activation="Tanh", output="v_out")
    body_graph = body.graph(
        [
            tensor_info("iter", [], TensorProto.INT64),
            tensor_info("cond_in", [], TensorProto.BOOL),
            tensor_info("v_in", ["N", 8, 7, 6]),
        ],
        [tensor_info("cond_out", [], TensorProto.BOOL), any_tensor("v_out")],
        "loop_body",
    )
    trips = b.int64(2, "trips")
    b.nodes.append(helper.make_node("Loop", [trips, "", "X"], ["Y"], body=body_graph, name="loop"))
    proto = b.model([tensor_info("X", ["N", 8, 7, 6])], [any_tensor("Y")])
    result, fold_pass = run_fold(proto)
    assert result.modified and len(fold_pass.rewrites) == 1
    (loop,) = [n for n in result.model.graph if n.op_type == "Loop"]
    assert_one_conv(
        loop.attributes["body"].as_graph(),
        group=2,
        weight_shape=[8, 4, 3, 3],
        output="v_out",
        activation="Tanh",
    )
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    ort_equal(proto, result.model)


def test_block_inside_model_local_function(ort_equal):
    """Functions have no initializers: weights are Constant nodes before and after."""
    b = GraphBuilder()
    body = b.child()
    conv_block(
        body, "fx", channels=8, as_node=True, batch_norm=True, activation="LeakyRelu", output="fy"
    )
    function = helper.make_function(
        "local", "Block", ["fx"], ["fy"], body.nodes, [helper.make_opsetid("", 17)]
    )
    b.nodes.append(helper.make_node("Block", ["X"], ["Y"], domain="local", name="block"))
    proto = b.model(
        [tensor_info("X", ["N", 8, 7, 6])],
        [any_tensor("Y")],
        functions=[function],
        extra_opsets=[helper.make_opsetid("local", 1)],
    )
    result, fold_pass = run_fold(proto)
    assert result.modified and len(fold_pass.rewrites) == 1
    assert fold_pass.rewrites[0].scope == "function local::Block"
    (fn,) = result.model.functions.values()
    assert_one_conv(
        fn.graph, group=2, weight_shape=[8, 4, 3, 3], output="fy", activation="LeakyRelu"
    )
    assert not fn.graph.initializers
    assert {n.op_type for n in fn} == {"Constant", "Conv", "LeakyRelu"}
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    ort_equal(proto, result.model)


@pytest.mark.parametrize("container", ["if", "loop"])
def test_outer_scope_weights_are_not_left_behind(container):
    b = GraphBuilder()
    body = b.child()
    if container == "loop":
        body.op("Identity", ["cond_in"], out="cond_out")
        conv_block(body, "v_in", channels=8, consts=b, output="v_out")
        body_graph = body.graph(
            [
                tensor_info("iter", [], TensorProto.INT64),
                tensor_info("cond_in", [], TensorProto.BOOL),
                tensor_info("v_in", ["N", 8, 7, 6]),
            ],
            [tensor_info("cond_out", [], TensorProto.BOOL), any_tensor("v_out")],
            "loop_body",
        )
        b.nodes.append(helper.make_node("Loop", [b.int64(2), "", "X"], ["Y"], body=body_graph))
        inputs = [tensor_info("X", ["N", 8, 7, 6])]
    else:
        conv_block(body, "X", channels=8, consts=b, output="then_Y")
        other = b.child()
        other.op("Relu", ["X"], out="else_Y")
        b.nodes.append(
            helper.make_node(
                "If",
                ["cond"],
                ["Y"],
                then_branch=body.graph([], [any_tensor("then_Y")], "then_branch"),
                else_branch=other.graph([], [any_tensor("else_Y")], "else_branch"),
            )
        )
        inputs = [tensor_info("X", ["N", 8, 7, 6]), tensor_info("cond", [], TensorProto.BOOL)]
    proto = b.model(inputs, [any_tensor("Y")])
    result, _ = run_fold(proto)
    assert result.modified
    assert dead_initializers(result.model.graph) == []


@pytest.mark.parametrize(
    ("options", "folds"),
    [
        pytest.param({}, 2, id="default-folds-both"),
        pytest.param({"subgraphs": False}, 1, id="subgraphs-off"),
        pytest.param({"functions": False}, 1, id="functions-off"),
    ],
)
def test_subgraph_and_function_switches(options, folds):
    b = GraphBuilder()
    body = b.child()
    conv_block(body, "fx", channels=8, as_node=True, output="fy")
    function = helper.make_function(
        "local", "Block", ["fx"], ["fy"], body.nodes, [helper.make_opsetid("", 17)]
    )
    then_b = b.child()
    conv_block(then_b, "X", channels=8, output="then_Y")
    then_graph = then_b.graph([], [any_tensor("then_Y")], "then_branch")
    else_b = b.child()
    else_b.op("Identity", ["Y0"], out="else_Y")
    else_graph = else_b.graph([], [any_tensor("else_Y")], "else_branch")
    b.nodes.append(helper.make_node("Block", ["X"], ["Y0"], domain="local"))
    b.nodes.append(
        helper.make_node("If", ["cond"], ["Y"], then_branch=then_graph, else_branch=else_graph)
    )
    inputs = [tensor_info("X", ["N", 8, 7, 6]), tensor_info("cond", [], TensorProto.BOOL)]
    proto = b.model(
        inputs,
        [any_tensor("Y")],
        functions=[function],
        extra_opsets=[helper.make_opsetid("local", 1)],
    )
    _, fold_pass = run_fold(proto, **options)
    assert len(fold_pass.rewrites) == folds


# ------------------------------------------------------------------------------ idempotence


IDEMPOTENCE_MODELS = [
    pytest.param(dict(batch_norm=True, activation="Relu"), id="bn-relu"),
    pytest.param(dict(form="slice", ranges=[(2, 6), (6, 10)], channels=12), id="gapped"),
    pytest.param(dict(overrides=[_k((3, 3)), _k((5, 5))]), id="mixconv"),
    pytest.param(dict(form="chunk", as_node=True), id="chunk-constant-nodes"),
]


@pytest.mark.parametrize("block", IDEMPOTENCE_MODELS)
def test_second_run_changes_nothing(block):
    result, _ = run_fold(block_model(**block))
    assert result.modified
    once = serialized(result.model)
    again, fold_pass = run_fold(ir.serde.serialize_model(result.model))
    assert again.modified is False and fold_pass.rewrites == []
    assert serialized(again.model) == once
    # The same pass object run on the same in-memory model again changes nothing either.
    second = FoldSplitConvConcat()(result.model)
    assert second.modified is False
    assert serialized(result.model) == once


def test_optimize_twice_writes_identical_files(tmp_path):
    b = GraphBuilder()
    y = conv_block(
        b,
        "X",
        channels=12,
        ranges=[(2, 6), (6, 10)],
        form="slice",
        batch_norm=True,
        activation="Relu",
    )
    conv_block(b, y, channels=8, overrides=[_k((3, 3)), _k((5, 5))], output="Y")
    source = tmp_path / "in.onnx"
    onnx.save(b.model([tensor_info("X", ["N", 12, 7, 6])], [any_tensor("Y")]), source)
    written = []
    for name in ("a.onnx", "b.onnx"):
        model, report = gconv_compile.optimize(str(source))
        assert len(report.rewrites) == 2 and report.check.passed
        written.append(save_model(model, tmp_path / name).read_bytes())
    assert written[0] == written[1]
    again, report = gconv_compile.optimize(str(tmp_path / "a.onnx"))
    assert report.rewrites == []
    save_model(again, tmp_path / "c.onnx")
    assert (tmp_path / "c.onnx").read_bytes() == written[0]


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
        lambda: _extra_consumer(),
        "also used by ['other_user']",
        {},
        id="conv-output-second-consumer",
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
        lambda: _extra_consumer(as_output=True),
        "is also a graph output",
        {},
        id="branch-is-graph-output",
    ),
    pytest.param(
        lambda: _extra_consumer(1, as_output=True, activation="Relu"),
        "is also a graph output",
        {},
        id="conv-output-under-relu-is-graph-output",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[_k((3, 3), pads=[0] * 4), _k((3, 3), strides=[2, 2], pads=[2, 2, 2, 2])]
        ),
        "'strides' differs",
        {},
        id="strides-differ",
    ),
    pytest.param(
        lambda: block_model(overrides=[_k((3, 3), pads=[1] * 4), _k((3, 3), pads=[0, 2, 2, 0])]),
        "padding differs",
        {},
        id="pads-differ",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[_k((3, 3), pads=[1] * 4), _k((3, 3), auto_pad="SAME_LOWER")]
        ),
        "padding differs",
        {},
        id="auto-pad-differs-with-same-kernel",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[_k((3, 3), pads=[0] * 4), _k((3, 3), dilations=[2, 2], pads=[1] * 4)]
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
        lambda: block_model(overrides=[_k((3, 3), pads=[0] * 4), _k((5, 5), pads=[1] * 4)]),
        "not centred 'same' padding",
        {},
        id="mixconv-not-centred",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[_k((2, 2), pads=[0, 0, 1, 1]), _k((4, 4), pads=[1, 1, 2, 2])]
        ),
        "not centred 'same' padding",
        {},
        id="mixconv-even-kernels",
    ),
    pytest.param(
        lambda: block_model(
            overrides=[
                _k((3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
                _k((5, 5), auto_pad="SAME_UPPER", strides=[2, 2]),
            ]
        ),
        "not centred 'same' padding",
        {},
        id="mixconv-same-upper-stride2",
    ),
    pytest.param(
        lambda: block_model(
            transpose=True, overrides=[_k((3, 3), pads=[1] * 4), _k((5, 5), pads=[2] * 4)]
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
        lambda: block_model(overrides=[_k((3, 3)), _k((5, 5))]),
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
