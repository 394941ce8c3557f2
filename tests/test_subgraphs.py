"""Folding in and around If/Loop bodies and model-local functions keeps the model valid.

Each model mixes blocks in the main graph with blocks inside control flow, and the bodies lean
on the outer scope the way exporters write them: weights that are main-graph initializers, a
Split in the main graph whose parts a body convolves, a main-graph Concat output that a body
reads. After the fold every outer-scope reference must still resolve (the ONNX checker's full
check), and every output of every branch must match onnxruntime's output before the fold: both
If branches are run by feeding the condition.

    main:  X ─ block ─ Y ─┐
           cond ─ If ─ then: Y, X ─ block(w from main) ─ ... ─ T
                       else: Split in main ─ body Convs ─ Concat ─ E
           Loop(body: state ─ block ─ Relu ─ state')
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import IR_VERSION, init, ints, tensor_info
from gconv_compile.passes import FoldSplitConvConcat
from onnx import TensorProto, helper

C = 8  # channels of X
N_BRANCH = 2
SPATIAL = [5, 5]


class Scope:
    """Collects the nodes and initializers of one graph while blocks are added to it."""

    def __init__(self, rng: np.random.Generator, prefix: str) -> None:
        self.rng = rng
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str, shape) -> str:
        self.inits.append(init(name, self.rng.standard_normal(shape).astype(np.float32)))
        return name


def add_block(
    scope: Scope,
    x: str,
    *,
    out: str,
    form: str = "split",
    weights_in: Scope | None = None,
    parts: list[str] | None = None,
    constant_nodes: bool = False,
) -> str:
    """X(C) -> split in N_BRANCH -> Conv 3x3 (C/N -> C/N each) -> Concat -> out (C channels).

    Args:
        scope: Graph the block's nodes go to.
        x: Name of the tensor to split.
        out: Name of the Concat output.
        form: "split" (Split with a sizes input) or "slice" (constant-bound Slices).
        weights_in: Graph whose initializers hold the weights (an outer scope), default scope.
        parts: Use these existing split parts instead of adding a splitter.
        constant_nodes: Weights as Constant nodes (what a function body must use).
    """
    p = f"{scope.prefix}{out}_"
    width = C // N_BRANCH
    holder = weights_in or scope

    def const(tensor: onnx.TensorProto) -> None:
        if constant_nodes:
            scope.nodes.append(helper.make_node("Constant", [], [tensor.name], value=tensor))
        else:
            holder.inits.append(tensor)

    if parts is None:
        parts = [f"{p}x{i}" for i in range(N_BRANCH)]
        if form == "split":
            const(ints(f"{p}sizes", [width] * N_BRANCH))
            scope.nodes.append(
                helper.make_node("Split", [x, f"{p}sizes"], parts, axis=1, name=f"{p}split")
            )
        else:
            for i in range(N_BRANCH):
                for tensor in (ints(f"{p}s{i}", [i * width]), ints(f"{p}e{i}", [(i + 1) * width]),
                               ints(f"{p}a{i}", [1])):  # fmt: skip
                    const(tensor)
                scope.nodes.append(helper.make_node(
                    "Slice", [x, f"{p}s{i}", f"{p}e{i}", f"{p}a{i}"], [parts[i]],
                    name=f"{p}slice{i}"))  # fmt: skip
    branch_outs = []
    for i, part in enumerate(parts):
        w = scope.rng.standard_normal((width, width, 3, 3)).astype(np.float32)
        b = scope.rng.standard_normal(width).astype(np.float32)
        const(init(f"{p}w{i}", w))
        const(init(f"{p}b{i}", b))
        scope.nodes.append(helper.make_node(
            "Conv", [part, f"{p}w{i}", f"{p}b{i}"], [f"{p}c{i}"], pads=[1, 1, 1, 1],
            name=f"{p}conv{i}"))  # fmt: skip
        branch_outs.append(f"{p}c{i}")
    scope.nodes.append(helper.make_node("Concat", branch_outs, [out], axis=1, name=f"{p}concat"))
    return out


def _info(name: str, batch="N") -> onnx.ValueInfoProto:
    return tensor_info(name, [batch, C, *SPATIAL])


def if_model(seed: int = 0) -> onnx.ModelProto:
    """Blocks in main, in both If branches, with outer-scope weights, parts and values."""
    rng = np.random.default_rng(seed)
    main = Scope(rng, "m_")
    add_block(main, "X", out="Y")

    then = Scope(rng, "t_")
    # Reads main's Concat output Y (renamed by nothing: the fold keeps the name) and X, with
    # weights that live in the main graph.
    add_block(then, "Y", out="t_y", weights_in=main)
    add_block(then, "X", out="t_x", form="slice")
    then.nodes.append(helper.make_node("Add", ["t_y", "t_x"], ["T"], name="t_add"))
    then_graph = helper.make_graph(then.nodes, "then_branch", [], [_info("T")], then.inits)

    # The else branch convolves parts that a Split in the main graph produced.
    main.inits.append(ints("m_outer_sizes", [C // N_BRANCH] * N_BRANCH))
    main.nodes.append(
        helper.make_node(
            "Split", ["X", "m_outer_sizes"], ["m_p0", "m_p1"], axis=1, name="m_outer_split"
        )
    )
    other = Scope(rng, "e_")
    add_block(other, "X", out="E", parts=["m_p0", "m_p1"])
    else_graph = helper.make_graph(other.nodes, "else_branch", [], [_info("E")], other.inits)

    main.nodes.append(
        helper.make_node(
            "If", ["cond"], ["B"], then_branch=then_graph, else_branch=else_graph, name="if"
        )
    )
    main.nodes.append(helper.make_node("Relu", ["B"], ["OUT"], name="m_relu"))
    graph = helper.make_graph(
        main.nodes, "main", [_info("X"), tensor_info("cond", [], TensorProto.BOOL)],
        [_info("OUT"), _info("Y")], main.inits,
    )  # fmt: skip
    return _model(graph)


def loop_model(seed: int = 1) -> onnx.ModelProto:
    """A Loop whose body folds a block on the carried state, with a nested If inside."""
    rng = np.random.default_rng(seed)
    main = Scope(rng, "m_")
    add_block(main, "X", out="Y")

    body = Scope(rng, "l_")
    add_block(body, "state", out="l_blk", weights_in=main)
    body.nodes.append(helper.make_node("Tanh", ["l_blk"], ["state_out"], name="l_tanh"))
    body.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="l_cond"))
    inner = Scope(rng, "i_")
    add_block(inner, "state_out", out="I")
    inner_then = helper.make_graph(inner.nodes, "inner_then", [], [_info("I")], inner.inits)
    inner_else = helper.make_graph(
        [helper.make_node("Neg", ["state_out"], ["I2"], name="i_neg")], "inner_else", [],
        [_info("I2")],
    )  # fmt: skip
    body.nodes.append(
        helper.make_node(
            "If", ["flag"], ["scan"], then_branch=inner_then, else_branch=inner_else, name="l_if"
        )
    )
    body_graph = helper.make_graph(
        body.nodes, "loop_body",
        [tensor_info("iter", [], TensorProto.INT64), tensor_info("cond_in", [], TensorProto.BOOL),
         _info("state")],
        [tensor_info("cond_out", [], TensorProto.BOOL), _info("state_out"), _info("scan")],
        body.inits,
    )  # fmt: skip
    main.inits.append(_scalar_i64("trips", 3))
    main.inits.append(onnx.numpy_helper.from_array(np.array(True), "keep_going"))
    main.nodes.append(
        helper.make_node(
            "Loop", ["trips", "keep_going", "Y"], ["FINAL", "SCANS"], body=body_graph, name="loop"
        )
    )
    graph = helper.make_graph(
        main.nodes, "main", [_info("X"), tensor_info("flag", [], TensorProto.BOOL)],
        [_info("FINAL"), tensor_info("SCANS", [3, "N", C, *SPATIAL])], main.inits,
    )  # fmt: skip
    return _model(graph)


def function_model(seed: int = 2) -> onnx.ModelProto:
    """A model-local function whose body holds a block (weights as Constant nodes)."""
    rng = np.random.default_rng(seed)
    body = Scope(rng, "f_")
    add_block(body, "fx", out="fy", constant_nodes=True)
    function = helper.make_function(
        "local.blocks", "Block", ["fx"], ["fy"], body.nodes, [helper.make_opsetid("", 17)]
    )
    nodes = [
        helper.make_node("Block", ["X"], ["A"], domain="local.blocks", name="call1"),
        helper.make_node("Block", ["A"], ["OUT"], domain="local.blocks", name="call2"),
    ]
    graph = helper.make_graph(nodes, "main", [_info("X")], [_info("OUT")])
    return _model(graph, functions=[function])


def _scalar_i64(name: str, value: int) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(value, dtype=np.int64), name)


def _model(graph: onnx.GraphProto, functions=()) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", 17)]
    if functions:
        opsets.append(helper.make_opsetid("local.blocks", 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldSplitConvConcat]:
    ir_model = ir.serde.deserialize_model(model)
    fold_pass = FoldSplitConvConcat()
    fold_pass(ir_model)
    return ir.serde.serialize_model(ir_model), fold_pass


def _run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).standard_normal([2, C, *SPATIAL]).astype(np.float32)


def _assert_same(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict) -> None:
    expected, actual = _run(before, feeds), _run(after, feeds)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-4, err_msg=name)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def _grouped_convs(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [
        n for n in _all_nodes(graph)
        if n.op_type == "Conv" and any(a.name == "group" and a.i == N_BRANCH for a in n.attribute)
    ]  # fmt: skip


def test_if_blocks_fold_in_main_and_both_branches() -> None:
    model = if_model()
    after, fold_pass = _fold(model)

    onnx.checker.check_model(after, full_check=True)
    scopes = sorted(r.scope for r in fold_pass.rewrites)
    assert scopes == ["main", "main/else_branch", "main/then_branch", "main/then_branch"]
    assert fold_pass.skips == []
    assert len(_grouped_convs(after.graph)) == 4
    assert not [n for n in _all_nodes(after.graph) if n.op_type == "Concat"]
    for cond in (True, False):
        for seed in (0, 1):
            _assert_same(model, after, {"X": _x(seed), "cond": np.array(cond)})


def test_if_outer_scope_names_still_resolve() -> None:
    """The then-branch still reads main's Y and X; main's weights it used are still there."""
    model = if_model()
    after, _ = _fold(model)
    if_node = next(n for n in after.graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in if_node.attribute}
    then_inputs = {i for n in branches["then_branch"].node for i in n.input}
    assert {"X", "Y"} <= then_inputs
    main_values = (
        {i.name for i in after.graph.input}
        | {t.name for t in after.graph.initializer}
        | {o for n in after.graph.node for o in n.output}
    )
    for name, graph in branches.items():
        local = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
        for node in graph.node:
            for value in node.input:
                assert not value or value in local or value in main_values, (name, value)


def test_loop_body_and_nested_if_fold() -> None:
    model = loop_model()
    after, fold_pass = _fold(model)

    onnx.checker.check_model(after, full_check=True)
    scopes = sorted(r.scope for r in fold_pass.rewrites)
    assert scopes == ["main", "main/inner_then", "main/loop_body"]
    assert len(_grouped_convs(after.graph)) == 3
    for flag in (True, False):
        _assert_same(model, after, {"X": _x(2), "flag": np.array(flag)})


@pytest.mark.parametrize("subgraphs", [False, True], ids=["main-only", "with-subgraphs"])
def test_subgraph_option(subgraphs: bool) -> None:
    """subgraphs=False folds the main graph only and leaves bodies exactly as they were."""
    model = if_model()
    ir_model = ir.serde.deserialize_model(model)
    fold_pass = FoldSplitConvConcat(subgraphs=subgraphs)
    fold_pass(ir_model)
    after = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(after, full_check=True)
    expected = 4 if subgraphs else 1
    assert len(fold_pass.rewrites) == expected
    if not subgraphs:
        before_if = next(n for n in model.graph.node if n.op_type == "If")
        after_if = next(n for n in after.graph.node if n.op_type == "If")
        for before_attr, after_attr in zip(before_if.attribute, after_if.attribute):
            assert [n.SerializeToString() for n in after_attr.g.node] == [
                n.SerializeToString() for n in before_attr.g.node
            ]
    for cond in (True, False):
        _assert_same(model, after, {"X": _x(3), "cond": np.array(cond)})


def test_function_body_folds_with_constant_nodes() -> None:
    model = function_model()
    after, fold_pass = _fold(model)

    onnx.checker.check_model(after, full_check=True)
    assert [r.scope for r in fold_pass.rewrites] == ["function local.blocks::Block"]
    body = after.functions[0]
    grouped = [n for n in body.node if n.op_type == "Conv"]
    assert len(grouped) == 1
    # Functions cannot hold initializers: the folded weight is a Constant node in the body.
    weight_producer = next(n for n in body.node if grouped[0].input[1] in n.output)
    assert weight_producer.op_type == "Constant"
    _assert_same(model, after, {"X": _x(4)})


def test_outer_scope_weights_used_only_by_folded_nodes_are_dropped() -> None:
    """Weights in main that only the then-branch's folded Convs read must not stay behind."""
    model = if_model()
    after, _ = _fold(model)
    left = {t.name for t in after.graph.initializer}
    assert not {n for n in left if n.startswith("t_t_y_")}, sorted(left)
    # The main-graph Split that only the else-branch's block read goes too, with its sizes.
    assert "m_outer_sizes" not in left
    assert "m_outer_split" not in {n.name for n in after.graph.node}
    # What main still uses stays: every main-graph node input still resolves.
    produced = {o for n in after.graph.node for o in n.output}
    available = produced | left | {i.name for i in after.graph.input}
    assert all(not i or i in available for n in after.graph.node for i in n.input)
