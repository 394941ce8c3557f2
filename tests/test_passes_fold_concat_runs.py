"""Fold runs of Conv branches inside a wider Concat (issue #11, item 3).

TorchScript merges nested ``torch.cat``s: ShuffleNet v1's down-sampling unit
``cat([shortcut, cat(conv_i(chunk_i))])`` is exported as one Concat whose inputs are the
shortcut and then the grouped conv's branches. Each run of consecutive branches that split one
tensor folds into one grouped Conv feeding the Concat in the run's place, so the channel order
is kept; the other inputs stay.

Positive cases: the expected rewrites, the Concat's new inputs, and onnxruntime outputs of the
model before against after. Negative cases: the reason, and nothing changed.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from builders import GraphBuilder, any_tensor, tensor_info
from gconv_compile.passes import FoldSplitConvConcat
from onnx import helper

C = 4  # channels per branch


def _branches(b: GraphBuilder, x: str, n: int, *, how: str = "split", bn_relu: bool = False):
    """n Conv branches on equal channel parts of ``x`` (split, slices or computed chunks)."""
    if how == "split":
        parts = b.split(x, [C] * n, form="split13")
    elif how == "slices":
        parts = [b.slice(x, i * C, (i + 1) * C) for i in range(n)]
    else:
        parts = b.chunk_slices(x, n)
    outs = []
    for part in parts:
        out = b.conv(part, C, C, (3, 3), pads=[1] * 4)
        if bn_relu:
            out = b.op("Relu", [b.batch_norm(out, C)])
        outs.append(out)
    return outs


def _model(b: GraphBuilder, concat_inputs, inputs: dict[str, int]) -> onnx.ModelProto:
    b.op("Concat", concat_inputs, axis=1, out="Y", name="cat")
    infos = [tensor_info(name, ["N", channels, 6, 5]) for name, channels in inputs.items()]
    return b.model(infos, [any_tensor("Y")])


def shortcut_before(how="split", bn_relu=False):
    b = GraphBuilder(1)
    shortcut = b.op("AveragePool", ["X"], kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1])
    runs = _branches(b, "X", 3, how=how, bn_relu=bn_relu)
    return _model(b, [shortcut, *runs], {"X": 3 * C})


def shortcut_after():
    b = GraphBuilder(2)
    runs = _branches(b, "X", 2)
    return _model(b, [*runs, b.op("Relu", ["S"])], {"X": 2 * C, "S": 3})


def shortcut_between_two_runs():
    b = GraphBuilder(3)
    first = _branches(b, "X", 2)
    second = _branches(b, "Z", 3)
    return _model(b, [*first, b.op("Sigmoid", ["X"]), *second], {"X": 2 * C, "Z": 3 * C})


def two_adjacent_runs():
    b = GraphBuilder(4)
    return _model(b, [*_branches(b, "X", 2), *_branches(b, "Z", 2)], {"X": 2 * C, "Z": 2 * C})


def conv_shortcut_then_run():
    """The shortcut is a Conv too, on the unsplit tensor: not part of the run."""
    b = GraphBuilder(5)
    shortcut = b.conv("X", 2 * C, C, (1, 1))
    return _model(b, [shortcut, *_branches(b, "X", 2)], {"X": 2 * C})


def split_part_as_shortcut():
    """The run takes two parts of a 3-way Split; the third is the shortcut: a window Slice."""
    b = GraphBuilder(9)
    parts = b.split("X", [C, C, C], form="split13")
    runs = [b.conv(p, C, C, (3, 3), pads=[1] * 4) for p in parts[:2]]
    return _model(b, [*runs, b.op("Relu", [parts[2]])], {"X": 3 * C})


def one_split_two_runs():
    """Parts 0-1 and 2-3 of one Split, around a foreign input: two windows of X."""
    b = GraphBuilder(10)
    parts = b.split("X", [C] * 4, form="split13")
    convs = [b.conv(p, C, C, (3, 3), pads=[1] * 4) for p in parts]
    return _model(b, [*convs[:2], b.op("Tanh", ["S"]), *convs[2:]], {"X": 4 * C, "S": 2})


# case -> (model, [(group of each grouped Conv)], op types of the Concat's inputs after)
RUNS = {
    "shortcut-before": (shortcut_before, [3], ["AveragePool", "Conv"]),
    "shortcut-before-bn-relu": (
        lambda: shortcut_before(bn_relu=True),
        [3],
        ["AveragePool", "Relu"],
    ),
    "shortcut-before-slices": (lambda: shortcut_before("slices"), [3], ["AveragePool", "Conv"]),
    "shortcut-before-torch-chunk": (
        lambda: shortcut_before("chunk"),
        [3],
        ["AveragePool", "Conv"],
    ),
    "shortcut-after": (shortcut_after, [2], ["Conv", "Relu"]),
    "shortcut-between-two-runs": (shortcut_between_two_runs, [2, 3], ["Conv", "Sigmoid", "Conv"]),
    "two-adjacent-runs": (two_adjacent_runs, [2, 2], ["Conv", "Conv"]),
    "conv-shortcut-then-run": (conv_shortcut_then_run, [2], ["Conv", "Conv"]),
    "split-part-as-shortcut": (split_part_as_shortcut, [2], ["Conv", "Relu"]),
    "one-split-two-runs": (one_split_two_runs, [2, 2], ["Conv", "Tanh", "Conv"]),
}


def run_fold(proto):
    model = ir.serde.deserialize_model(proto)
    fold = FoldSplitConvConcat()
    return fold(model), fold


def concat_of(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "Concat"]
    return node


@pytest.mark.parametrize("case", list(RUNS))
def test_each_run_folds_in_its_place(case, ort_equal):
    build, groups, concat_inputs = RUNS[case]
    before = build()
    result, fold = run_fold(before)

    assert result.modified is True and fold.skips == [], [s.reason for s in fold.skips]
    assert [r.details["group"] for r in fold.rewrites] == groups
    assert all(r.anchor == "cat" for r in fold.rewrites)
    assert all("the others stay" in r.summary for r in fold.rewrites)
    concat = concat_of(result.model)
    assert concat.name == "cat" and concat.outputs[0].name == "Y"
    assert [v.producer().op_type for v in concat.inputs] == concat_inputs
    grouped = [n for n in result.model.graph if n.op_type == "Conv" and "group" in n.attributes]
    assert sorted(n.attributes["group"].as_int() for n in grouped) == sorted(groups)
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    ort_equal(before, result.model)


def test_a_run_refused_while_another_folds_is_reported(ort_equal):
    b = GraphBuilder(6)
    first = _branches(b, "X", 2)
    parts = b.split("Z", [C, C], form="split13")
    odd = [
        b.op(op, [b.conv(part, C, C, (3, 3), pads=[1] * 4)])
        for op, part in zip(("Relu", "Sigmoid"), parts)
    ]
    before = _model(b, [*first, b.op("Relu", ["X"]), *odd], {"X": 2 * C, "Z": 2 * C})
    result, fold = run_fold(before)
    assert result.modified is True
    assert [r.details["group"] for r in fold.rewrites] == [2]
    assert [s.anchor for s in fold.skips] == ["cat"]
    assert "different activations ['Relu', 'Sigmoid']" in fold.skips[0].reason
    assert [v.producer().op_type for v in concat_of(result.model).inputs] == [
        "Conv", "Relu", "Relu", "Sigmoid",
    ]  # fmt: skip
    ort_equal(before, result.model)


def _no_run_left():
    """A foreign input between two branches leaves no run of two."""
    b = GraphBuilder(7)
    parts = b.split("X", [C, C, C], form="split13")
    outs = [b.conv(p, C, C, (3, 3), pads=[1] * 4) for p in (parts[0], parts[2])]
    return _model(b, [outs[0], b.op("Relu", [parts[1]]), outs[1]], {"X": 3 * C})


def test_run_output_used_elsewhere_folds_and_the_user_reads_a_slice(ort_equal):
    """Issue #11 item 4: the extra consumer reads a Slice of the run's grouped output."""
    before = _run_value_used_elsewhere()
    result, fold = run_fold(before)
    assert result.modified is True, fold.skips
    (rewrite,) = fold.rewrites
    assert "branch output(s) 1 also used elsewhere: read from a Slice" in rewrite.summary
    extra = next(n for n in result.model.graph if n.outputs[0].name == "Extra")
    part = extra.inputs[0].producer()
    assert part.op_type == "Slice" and part.inputs[0].producer().op_type == "Conv"
    assert [n.op_type for n in result.model.graph].count("Conv") == 1
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    ort_equal(before, result.model)


def _run_value_used_elsewhere():
    b = GraphBuilder(8)
    runs = _branches(b, "X", 2)
    b.op("Relu", [runs[1]], out="Extra")
    model = _model(b, [b.op("Relu", ["X"]), *runs], {"X": 2 * C})
    model.graph.output.append(any_tensor("Extra"))
    return model


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        pytest.param(_no_run_left, "Concat input 1 is not produced by a Conv branch",
                     id="foreign-input-between-two-branches"),
    ],
)  # fmt: skip
def test_no_foldable_run_leaves_the_model_alone(build, reason, ort_equal):
    """Expected = Before."""
    before = build()
    untouched = ir.serde.serialize_model(ir.serde.deserialize_model(before)).SerializeToString()
    result, fold = run_fold(before)
    assert result.modified is False and fold.rewrites == []
    assert len(fold.skips) == 1 and reason in fold.skips[0].reason, fold.skips
    assert ir.serde.serialize_model(result.model).SerializeToString() == untouched
    ort_equal(before, result.model)


def test_run_inside_a_function_folds_with_constant_nodes(ort_equal):
    """Functions have no initializers: the grouped weight is a Constant node. (fx has no shape
    in the body, so the run covers its whole Split: a window would need fx's channel count.)"""
    b = GraphBuilder(11)
    body = b.child()
    parts = body.split("fx", [C, C], form="split13", as_node=True)
    runs = [body.conv(p, C, C, (3, 3), pads=[1] * 4, as_node=True) for p in parts]
    body.op("Concat", [body.op("Sigmoid", ["fx"]), *runs], axis=1, out="fy", name="fcat")
    function = helper.make_function(
        "local", "Unit", ["fx"], ["fy"], body.nodes, [helper.make_opsetid("", 17)]
    )
    b.nodes.append(helper.make_node("Unit", ["X"], ["Y"], domain="local", name="unit"))
    before = b.model(
        [tensor_info("X", ["N", 2 * C, 6, 5])],
        [any_tensor("Y")],
        functions=[function],
        extra_opsets=[helper.make_opsetid("local", 1)],
    )
    result, fold = run_fold(before)
    assert result.modified is True and fold.skips == []
    assert [(r.scope, r.details["group"]) for r in fold.rewrites] == [("function local::Unit", 2)]
    (fn,) = result.model.functions.values()
    assert not fn.graph.initializers
    (concat,) = [n for n in fn if n.op_type == "Concat"]
    assert [v.producer().op_type for v in concat.inputs] == ["Sigmoid", "Conv"]
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    ort_equal(before, result.model)
