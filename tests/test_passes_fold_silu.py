"""SiLU / Swish branches (``Mul(v, Sigmoid(v))``, what exporters write before opset 24) fold
like any elementwise activation: the grouped Conv is followed by one Sigmoid and one Mul.
YOLO's C3 and EfficientNet-style blocks end their branches this way."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from builders import GraphBuilder, any_tensor, tensor_info
from gconv_compile.passes import FoldSplitConvConcat


def _silu_block(order: str = "value-first", gate_used_elsewhere: bool = False):
    b = GraphBuilder(11)
    parts = b.split("X", [4, 4], form="split13")
    outs = []
    for i, part in enumerate(parts):
        v = b.conv(part, 4, 4, (3, 3), pads=[1] * 4)
        gate = b.op("Sigmoid", [v])
        outs.append(b.op("Mul", [v, gate] if order == "value-first" else [gate, v]))
        if gate_used_elsewhere and i == 0:
            b.op("Neg", [gate], out="Z")
    b.op("Concat", outs, axis=1, out="Y", name="cat")
    outputs = [any_tensor("Y")] + ([any_tensor("Z")] if gate_used_elsewhere else [])
    return b.model([tensor_info("X", ["N", 8, 6, 5])], outputs)


@pytest.mark.parametrize("order", ["value-first", "gate-first"])
def test_silu_branches_fold(order, ort_equal):
    proto = _silu_block(order)
    model = ir.serde.deserialize_model(proto)
    fold = FoldSplitConvConcat()
    assert fold(model).modified is True, fold.skips
    assert [n.op_type for n in model.graph] == ["Conv", "Sigmoid", "Mul"]
    assert "SiLU moved after the grouped Conv" in fold.rewrites[0].summary
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    ort_equal(proto, model)


def test_silu_gate_used_elsewhere_is_refused(ort_equal):
    proto = _silu_block(gate_used_elsewhere=True)
    model = ir.serde.deserialize_model(proto)
    untouched = ir.serde.serialize_model(model).SerializeToString()
    fold = FoldSplitConvConcat()
    assert fold(model).modified is False
    assert ir.serde.serialize_model(model).SerializeToString() == untouched
    (skip,) = fold.skips
    assert "is also used elsewhere" in skip.reason
    ort_equal(proto, model)
