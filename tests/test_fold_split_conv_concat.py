"""Tests for passes.fold_split_conv_concat: the split forms, Conv variants, BatchNormalization and
activations, grouped branches, ConvTranspose, and idempotence.

Positive cases check the structure (one Conv/ConvTranspose with the right ``group`` and weight
shape, no Split/Concat left, the result under the original output name) and the numbers
(onnxruntime on the model serialised before the pass against the model after). The other fold
tests: ``test_passes_fold_forms.py`` (MixConv, gapped windows, other graph shapes),
``test_passes_fold_scopes.py`` (If/Loop bodies, functions), ``test_passes_fold_refusals.py``
(every refusal), ``test_passes_fold_concat_runs.py`` (runs inside a wider Concat). Models and checks come from ``builders`` (``block_model``, ``assert_folds``, ``assert_refused``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import (
    SYMBOLIC_C,
    SYMBOLIC_C_FEED,
    GraphBuilder,
    any_tensor,
    assert_folds,
    block_model,
    conv_block,
    kernel_override,
    run_fold,
    serialized,
    tensor_info,
)
from gconv_compile.passes import FoldSplitConvConcat

import gconv_compile
from gconv_compile.model_io import save_model

# ------------------------------------------------------------------------ positive cases

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


# ------------------------------------------------------------------------------ idempotence


IDEMPOTENCE_MODELS = [
    pytest.param(dict(batch_norm=True, activation="Relu"), id="bn-relu"),
    pytest.param(dict(form="slice", ranges=[(2, 6), (6, 10)], channels=12), id="gapped"),
    pytest.param(dict(overrides=[kernel_override((3, 3)), kernel_override((5, 5))]), id="mixconv"),
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
    conv_block(
        b, y, channels=8, overrides=[kernel_override((3, 3)), kernel_override((5, 5))], output="Y"
    )
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
