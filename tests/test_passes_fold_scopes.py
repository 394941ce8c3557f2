"""Fold pass inside If/Loop bodies and model-local functions, and the switches that turn it off.

Functions have no initializers (weights are Constant nodes before and after); outer-scope
weights a body uses must not be left behind. Models and checks come from ``builders`` (``block_model``, ``assert_folds``, ``assert_refused``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import (
    GraphBuilder,
    any_tensor,
    assert_one_conv,
    conv_block,
    dead_initializers,
    run_fold,
    tensor_info,
)
from onnx import TensorProto, helper

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
