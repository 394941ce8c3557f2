"""Tests for passes.expand_grouped_conv: both modes, both conv kinds, every option, every refusal.

Positive cases check the structure (Split form, branch weights, block-diagonal dense weight, no
``group > 1`` left, the result under the Conv output's name) and the numbers (onnxruntime on
the model serialised before the pass against the model after). Negative cases check
``modified is False``, the reason, a byte-identical model and unchanged outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from gconv_compile.passes import PASSES, ConvGeometry, ExpandGroupedConv
from gconv_compile.passes._common import const_array
from gconv_compile.passes.expand_grouped_conv import block_diagonal_weight
from grouped_models import (
    assert_same_outputs,
    conv_chain,
    grouped_conv,
    grouped_conv_in_function,
    grouped_conv_in_if,
    grouped_convs,
)
from onnx import helper

# ------------------------------------------------------------------------------ helpers


def run_expand(proto: onnx.ModelProto, **options) -> tuple[ir.Model, ExpandGroupedConv, bool]:
    model = ir.serde.deserialize_model(proto)
    expand_pass = ExpandGroupedConv(**options)
    result = expand_pass(model)
    return model, expand_pass, result.modified


def serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def canonical(proto: onnx.ModelProto) -> bytes:
    """``proto`` as the pass would write it untouched (an onnx-ir round trip)."""
    return serialized(ir.serde.deserialize_model(proto))


def ops(graph: ir.Graph) -> list[str]:
    return [node.op_type for node in graph]


def weight_of(node: ir.Node) -> np.ndarray:
    weight = const_array(node.inputs[1])
    assert weight is not None
    return weight


# Conv kinds x attribute forms; each entry: id, grouped_conv(...) arguments.
CONV_CASES = [
    ("conv2d-g2", {}),
    ("conv2d-g4-no-bias", {"group": 4, "channels_out": 8, "bias": False}),
    ("conv1d", {"kernel": (3,), "spatial": (9,), "attrs": {"pads": [1, 1]}}),
    ("conv3d", {"kernel": (1, 3, 3), "spatial": (3, 5, 5), "attrs": {"pads": [0, 1, 1] * 2}}),
    ("conv2d-asymmetric-pads", {"attrs": {"pads": [0, 1, 2, 1]}}),
    ("conv2d-same-upper-stride2", {"attrs": {"auto_pad": "SAME_UPPER", "strides": [2, 2]}}),
    ("conv2d-same-lower", {"attrs": {"auto_pad": "SAME_LOWER"}}),
    ("conv2d-valid", {"attrs": {"auto_pad": "VALID"}}),
    ("conv2d-dilated-strided", {"attrs": {"dilations": [2, 1], "strides": [1, 2]}}),
    ("conv2d-kernel-shape-attr", {"attrs": {"kernel_shape": [3, 3], "pads": [1] * 4}}),
    ("conv2d-symbolic-spatial", {"spatial": ("H", "W"), "attrs": {"pads": [1] * 4}}),
    ("conv2d-static-batch", {"batch": 3}),
    ("depthwise", {"group": 8, "channels_out": 8}),
    ("depthwise-multiplier-3", {"group": 8, "channels_out": 24}),
    ("conv2d-opset11", {"opset": 11}),
    ("conv2d-opset13", {"opset": 13}),
    ("conv2d-opset18", {"opset": 18}),
    ("transpose2d", {"transpose": True}),
    ("transpose2d-no-bias-g4", {"transpose": True, "group": 4, "channels_out": 8, "bias": False}),
    ("transpose1d", {"transpose": True, "kernel": (4,), "spatial": (6,), "attrs": {"strides": [2]}}),
    ("transpose3d", {"transpose": True, "kernel": (2, 2, 2), "spatial": (2, 3, 3)}),
    ("transpose-stride2-outpad", {"transpose": True,
                                  "attrs": {"strides": [2, 2], "output_padding": [1, 0], "pads": [1, 0, 0, 1]}}),
    ("transpose-output-shape", {"transpose": True, "attrs": {"strides": [2, 2], "output_shape": [15, 16]}}),
    ("transpose-same-upper", {"transpose": True, "attrs": {"auto_pad": "SAME_UPPER", "strides": [2, 2]}}),
    ("transpose-same-lower-output-shape", {"transpose": True, "attrs": {
        "auto_pad": "SAME_LOWER", "strides": [2, 2], "output_shape": [14, 14]}}),
    ("transpose-dilated", {"transpose": True, "attrs": {"dilations": [2, 2]}}),
    ("transpose-depthwise-multiplier-2", {"transpose": True, "group": 8, "channels_out": 16}),
    ("transpose-opset11", {"transpose": True, "opset": 11}),
    ("transpose-symbolic-spatial", {"transpose": True, "spatial": ("H", "W")}),
]  # fmt: skip


def _case_params():
    return [pytest.param(kwargs, id=name) for name, kwargs in CONV_CASES]


# ------------------------------------------------------------------------------ split mode


@pytest.mark.parametrize("case", _case_params())
def test_split_expands_every_conv_kind(case):
    proto = grouped_conv(**case)
    group = case.get("group", 2)
    op = "ConvTranspose" if case.get("transpose") else "Conv"
    original = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    model, expand_pass, modified = run_expand(proto, mode="split")

    assert modified is True
    assert len(expand_pass.rewrites) == 1 and not expand_pass.skips
    graph = model.graph
    assert ops(graph) == ["Split"] + [op] * group + ["Concat", "Relu"]
    split = graph.node(0)
    opset = case.get("opset", 17)
    assert split.attributes["axis"].as_int() == 1
    sizes = [case.get("channels_in", 8) // group] * group
    if opset < 13:  # sizes as an attribute before opset 13, as an input from 13 on
        assert len(split.inputs) == 1
        assert list(split.attributes["split"].as_ints()) == sizes
    else:
        assert "split" not in split.attributes
        given = const_array(split.inputs[1])
        assert given is not None and given.dtype == np.int64 and list(given) == sizes
    branches = [n for n in graph if n.op_type == op]
    for index, branch in enumerate(branches):
        assert "group" not in branch.attributes
        assert branch.inputs[0] is split.outputs[index]
        width = original.shape[0] // group
        np.testing.assert_array_equal(
            weight_of(branch), original[index * width : (index + 1) * width]
        )
    concat = graph.node(group + 1)
    assert concat.attributes["axis"].as_int() == 1
    assert list(concat.inputs) == [b.outputs[0] for b in branches]
    # The Concat took over the Conv output's name: graph output C and the Relu read it.
    assert concat.outputs[0].name == "C" and concat.outputs[0].is_graph_output()
    assert graph.node(group + 2).inputs[0] is concat.outputs[0]
    assert not grouped_convs(model)
    assert "W" not in graph.initializers and "B" not in graph.initializers  # sliced, then gone
    assert_same_outputs(proto, model)


def test_split_branch_biases_are_slices():
    proto = grouped_conv(group=3, channels_in=6, channels_out=9)
    bias = onnx.numpy_helper.to_array(proto.graph.initializer[1])
    model, _, _ = run_expand(proto)
    branches = [n for n in model.graph if n.op_type == "Conv"]
    for index, branch in enumerate(branches):
        np.testing.assert_array_equal(
            const_array(branch.inputs[2]), bias[3 * index : 3 * index + 3]
        )
    assert "B" not in model.graph.initializers


def test_transpose_split_slices_input_channels_of_weight():
    """ConvTranspose weights are [C_in, C_out/G, k...]: each branch takes rows, not columns."""
    proto = grouped_conv(transpose=True, group=2, channels_in=8, channels_out=6)
    weight = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    assert weight.shape == (8, 3, 3, 3)
    model, _, _ = run_expand(proto)
    branches = [n for n in model.graph if n.op_type == "ConvTranspose"]
    assert [list(weight_of(b).shape) for b in branches] == [[4, 3, 3, 3], [4, 3, 3, 3]]
    np.testing.assert_array_equal(weight_of(branches[1]), weight[4:])
    assert_same_outputs(proto, model)


def test_transpose_keeps_output_shape_and_auto_pad_on_every_branch():
    attrs = {"auto_pad": "SAME_UPPER", "strides": [2, 2], "output_shape": [15, 13]}
    proto = grouped_conv(transpose=True, group=2, attrs=attrs)
    model, _, _ = run_expand(proto)
    for branch in (n for n in model.graph if n.op_type == "ConvTranspose"):
        assert list(branch.attributes["output_shape"].as_ints()) == [15, 13]
        assert branch.attributes["auto_pad"].as_string() == "SAME_UPPER"
        assert list(branch.attributes["strides"].as_ints()) == [2, 2]
    assert_same_outputs(proto, model)


# ------------------------------------------------------------------------------ dense mode


@pytest.mark.parametrize("case", _case_params())
def test_dense_expands_every_conv_kind(case):
    proto = grouped_conv(**case)
    group = case.get("group", 2)
    op = "ConvTranspose" if case.get("transpose") else "Conv"
    original = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    model, expand_pass, modified = run_expand(proto, mode="dense")

    assert modified is True
    assert ops(model.graph) == [op, "Relu"]
    conv = model.graph.node(0)
    assert "group" not in conv.attributes
    dense = weight_of(conv)
    rows, cols = original.shape[:2]
    assert dense.shape == (rows, cols * group, *original.shape[2:])
    per = rows // group
    for g in range(group):  # each group's block is the original slice; everything else zero
        block = dense[g * per : (g + 1) * per]
        np.testing.assert_array_equal(
            block[:, g * cols : (g + 1) * cols], original[g * per : (g + 1) * per]
        )
        outside = np.delete(block, np.s_[g * cols : (g + 1) * cols], axis=1)
        assert not outside.any()
    assert conv.outputs[0].name == "C"
    record = expand_pass.rewrites[0]
    assert record.details["flop_multiplier"] == group and record.details["mode"] == "dense"
    assert_same_outputs(proto, model)


def test_dense_keeps_the_original_bias():
    proto = grouped_conv(group=2)
    model, _, _ = run_expand(proto, mode="dense")
    conv = model.graph.node(0)
    assert conv.inputs[2].name == "B"
    assert set(model.graph.initializers) == {"B", conv.inputs[1].name}


@pytest.mark.parametrize(
    ("group", "warned"),
    [pytest.param(2, False, id="2x-quiet"), pytest.param(4, True, id="4x-warns"),
     pytest.param(8, True, id="8x-warns")],
)  # fmt: skip
def test_dense_warns_from_4x_the_work(group, warned):
    proto = grouped_conv(group=group, channels_in=8, channels_out=8)
    _, expand_pass, _ = run_expand(proto, mode="dense")
    if warned:
        (warning,) = expand_pass.warnings
        assert f"{group}x the multiply-adds" in warning and "gconv" in warning
    else:
        assert expand_pass.warnings == []


def test_dense_above_the_limit_falls_back_to_split():
    proto = conv_chain([("small", "Conv", 2, 8), ("wide", "Conv", 8, 8)])
    model, expand_pass, _ = run_expand(proto, mode="dense", max_dense_multiplier=4)
    modes = {r.anchor: (r.details["mode"], r.details["notes"]) for r in expand_pass.rewrites}
    assert modes["small"] == ("dense", [])
    assert modes["wide"][0] == "split" and "limit 4x" in modes["wide"][1][0]
    assert expand_pass.warnings == []  # the 8x dense Conv was not built
    assert ops(model.graph).count("Conv") == 1 + 8
    assert_same_outputs(proto, model)


def test_block_diagonal_weight_matches_grouped_conv_definition():
    """Dense[o, i] is W[o, i - g*cin_g] when i is in o's group g, else zero."""
    weight = np.random.default_rng(5).standard_normal((6, 2, 3)).astype(np.float32)
    dense = block_diagonal_weight(weight, 3)
    for o in range(6):
        for i in range(6):
            expected = weight[o, i - 2 * (o // 2)] if i // 2 == o // 2 else np.zeros(3)
            np.testing.assert_array_equal(dense[o, i], expected)


# ------------------------------------------------------------------------------ options


MIXED = [
    ("g2", "Conv", 2, 8),        # grouped
    ("dw", "Conv", 8, 16),       # depthwise, channel multiplier 2
    ("g4", "Conv", 4, 8),        # grouped
    ("tg2", "ConvTranspose", 2, 8),
    ("tdw", "ConvTranspose", 8, 8),  # depthwise ConvTranspose
    ("dense", "Conv", 1, 8),     # not grouped: never touched, never reported
]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "expanded", "kept"),
    [
        pytest.param({}, ["g2", "dw", "g4", "tg2", "tdw"], {}, id="everything"),
        pytest.param({"keep_depthwise": True}, ["g2", "g4", "tg2"],
                     {"dw": "depthwise", "tdw": "depthwise"}, id="keep-depthwise"),
        pytest.param({"min_group": 4}, ["dw", "g4", "tdw"],
                     {"g2": "below the minimum 4", "tg2": "below the minimum 4"}, id="min-group-4"),
        pytest.param({"max_group": 4}, ["g2", "g4", "tg2"],
                     {"dw": "above the maximum 4", "tdw": "above the maximum 4"}, id="max-group-4"),
        pytest.param({"min_group": 3, "max_group": 4}, ["g4"],
                     {"g2": "below", "tg2": "below", "dw": "above", "tdw": "above"}, id="group-range"),
        pytest.param({"skip": ["g4", "tdw", "no-such-node"]}, ["g2", "dw", "tg2"],
                     {"g4": "skip list", "tdw": "skip list"}, id="skip-names"),
        pytest.param({"op_types": ["ConvTranspose"]}, ["tg2", "tdw"], {}, id="conv-transpose-only"),
        pytest.param({"op_types": ["Conv"], "keep_depthwise": True}, ["g2", "g4"],
                     {"dw": "depthwise"}, id="conv-only-keep-depthwise"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["split", "dense"])
def test_options_choose_what_expands(options, expanded, kept, mode):
    proto = conv_chain(MIXED)
    model, expand_pass, modified = run_expand(proto, mode=mode, **options)
    assert modified is True
    assert sorted(r.anchor for r in expand_pass.rewrites) == sorted(expanded)
    reasons = {s.anchor: s.reason for s in expand_pass.skips}
    assert set(reasons) == set(kept)
    for name, fragment in kept.items():
        assert fragment in reasons[name], reasons[name]
    remaining = sorted(name for name, *_ in grouped_convs(model))
    assert remaining == sorted({"g2", "dw", "g4", "tg2", "tdw"} - set(expanded))
    assert_same_outputs(proto, model, seeds=(0,))


def _wide_groups_only(node: ir.Node, geometry: ConvGeometry) -> str | None:
    """A target's cost decision: expand only groups of at least 4 input channels."""
    if geometry.in_per_group >= 4:
        return None
    return f"{geometry.in_per_group} in-channels per group: the grouped kernel is cheaper"


@pytest.mark.parametrize("mode", ["split", "dense"])
def test_select_predicate_decides_with_the_geometry_and_gives_the_reason(mode):
    """The predicate sees each candidate and its geometry; a string is the skip reason."""
    proto = conv_chain(MIXED)
    seen: list[tuple[str, str, int, int, int]] = []

    def select(node: ir.Node, geometry: ConvGeometry) -> str | None:
        seen.append((node.name, geometry.op_type, geometry.group, geometry.in_channels,
                     geometry.out_channels))  # fmt: skip
        return _wide_groups_only(node, geometry)

    model, expand_pass, modified = run_expand(proto, mode=mode, select=select)
    assert modified is True
    # Channels along MIXED: X has 8; g2 -> 8, dw -> 16, g4 -> 8, tg2 -> 8, tdw -> 8.
    assert seen == [
        ("g2", "Conv", 2, 8, 8),
        ("dw", "Conv", 8, 8, 16),
        ("g4", "Conv", 4, 16, 8),
        ("tg2", "ConvTranspose", 2, 8, 8),
        ("tdw", "ConvTranspose", 8, 8, 8),
    ]
    assert sorted(r.anchor for r in expand_pass.rewrites) == ["g2", "g4", "tg2"]
    assert {s.anchor: s.reason for s in expand_pass.skips} == {
        "dw": "1 in-channels per group: the grouped kernel is cheaper",
        "tdw": "1 in-channels per group: the grouped kernel is cheaper",
    }
    assert sorted(name for name, *_ in grouped_convs(model)) == ["dw", "tdw"]
    assert_same_outputs(proto, model, seeds=(0,))


def test_select_is_asked_only_after_the_other_options():
    asked: list[str] = []

    def select(node: ir.Node, geometry: ConvGeometry) -> str | None:
        asked.append(node.name)
        return None

    proto = conv_chain(MIXED)
    _, expand_pass, _ = run_expand(proto, keep_depthwise=True, skip=["g4"], select=select)
    assert asked == ["g2", "tg2"]
    assert sorted(r.anchor for r in expand_pass.rewrites) == ["g2", "tg2"]


def test_select_refusing_everything_leaves_the_model_alone():
    """Expected = Before."""
    proto = conv_chain(MIXED)
    model, expand_pass, modified = run_expand(proto, select=lambda node, geometry: "kept")
    assert modified is False and expand_pass.rewrites == []
    assert [s.reason for s in expand_pass.skips] == ["kept"] * 5
    assert serialized(model) == canonical(proto)


def test_registered_under_kebab_case_name():
    assert PASSES["expand-grouped-conv"] is ExpandGroupedConv


@pytest.mark.parametrize(
    "options",
    [pytest.param({"mode": "sparse"}, id="bad-mode"),
     pytest.param({"op_types": ["Gemm"]}, id="bad-op-type"),
     pytest.param({"min_group": 8, "max_group": 4}, id="empty-range")],
)  # fmt: skip
def test_bad_options_raise(options):
    with pytest.raises(ValueError):
        ExpandGroupedConv(**options)


# ------------------------------------------------------------------------------ scopes


@pytest.mark.parametrize("mode", ["split", "dense"])
def test_expands_inside_functions_with_constant_nodes(mode):
    proto = grouped_conv_in_function(group=4)
    model, expand_pass, modified = run_expand(proto, mode=mode)
    assert modified is True
    assert expand_pass.rewrites[0].scope == "function local::GroupedBlock"
    (function,) = model.functions.values()
    body = [n.op_type for n in function]
    assert "Conv" in body and not any(
        n.op_type == "Conv" and "group" in n.attributes for n in function
    )
    # dense: the new weight and the bias it still reads; split: sizes, 4 weights, 4 biases.
    assert body.count("Constant") == (2 if mode == "dense" else 1 + 4 + 4)
    assert_same_outputs(proto, model)


def test_expands_inside_if_branches():
    proto = grouped_conv_in_if()
    model, expand_pass, modified = run_expand(proto)
    assert modified is True and expand_pass.rewrites[0].anchor == "sub_conv"
    feeds = [
        {"X": np.random.default_rng(s).standard_normal((2, 4, 5, 5)).astype(np.float32),
         "flag": np.array(True)}
        for s in (0, 1)
    ]  # fmt: skip
    assert_same_outputs(proto, model, feeds=feeds)
    then_branch = model.graph.node(0).attributes["then_branch"].as_graph()
    assert "Split" in ops(then_branch) and "sub_w" not in then_branch.initializers


def test_subgraphs_and_functions_can_be_left_alone():
    for proto, option in (
        (grouped_conv_in_if(), "subgraphs"),
        (grouped_conv_in_function(), "functions"),
    ):
        model, _, modified = run_expand(proto, **{option: False})
        assert modified is False
        assert serialized(model) == canonical(proto)


# ------------------------------------------------------------------------------ refusals


def _weight_as_input() -> onnx.ModelProto:
    proto = grouped_conv()
    proto.graph.input.append(
        helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [6, 4, 3, 3])
    )
    return proto


def _bias_computed() -> onnx.ModelProto:
    proto = grouped_conv()
    conv = proto.graph.node[0]
    proto.graph.node.insert(0, helper.make_node("Neg", ["B"], ["B_neg"]))
    conv.input[2] = "B_neg"
    return proto


def _weight_computed() -> onnx.ModelProto:
    proto = grouped_conv()
    proto.graph.node.insert(0, helper.make_node("Neg", ["W"], ["W_neg"]))
    proto.graph.node[1].input[1] = "W_neg"
    return proto


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        pytest.param(_weight_as_input, "weight of gconv is not a constant", id="weight-is-graph-input"),
        pytest.param(_weight_computed, "weight of gconv is not a constant", id="weight-computed"),
        pytest.param(_bias_computed, "bias of gconv is not a constant", id="bias-computed"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["split", "dense"])
def test_refuses_and_leaves_the_model_alone(build, reason, mode):
    proto = build()
    model, expand_pass, modified = run_expand(proto, mode=mode)
    assert modified is False
    assert [s.reason for s in expand_pass.skips] == [reason]
    assert serialized(model) == canonical(proto)
    assert_same_outputs(proto, model, seeds=(0,))


def test_ungrouped_convs_are_not_candidates():
    proto = grouped_conv(group=1)
    model, expand_pass, modified = run_expand(proto)
    assert modified is False and expand_pass.skips == [] and expand_pass.rewrites == []


def test_fresh_names_do_not_collide():
    """A model that already uses the names the pass would pick gets suffixed ones."""
    proto = grouped_conv()
    proto.graph.node[1].output[0] = "gconv_expanded_split"  # the Relu's output
    proto.graph.output[0].name = "gconv_expanded_split"
    model, _, _ = run_expand(proto)
    names = [n.name for n in model.graph]
    assert len(names) == len(set(names))
    values = [v.name for n in model.graph for v in n.outputs]
    assert len(values) == len(set(values))
    assert_same_outputs(proto, model, seeds=(0,))
