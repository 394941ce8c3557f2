"""FoldSliceBounds: computed Slice bounds / Split sizes become constants, outputs unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from builders import make_model, tensor_info
from gconv_compile.passes import FoldSliceBounds
from onnx import TensorProto, helper

FIXTURES = Path(__file__).parent / "fixtures" / "torch"


def _run(proto: onnx.ModelProto) -> tuple[ir.Model, FoldSliceBounds]:
    model = ir.serde.deserialize_model(proto)
    fold = FoldSliceBounds()
    fold(model)
    return model, fold


def test_torchscript_chunk_bounds_become_constants(ort_equal):
    """torch.chunk exported by TorchScript: Shape/Gather/Div/Mul arithmetic feeds each Slice."""
    proto = onnx.load(FIXTURES / "mixed_kernel_nopad_ts17.onnx")  # not folded: slices stay
    before_ops = [n.op_type for n in proto.graph.node]
    assert "Shape" in before_ops
    model, fold = _run(proto)
    assert fold.rewrites, "expected the Slice bounds to be folded"
    ops = [n.op_type for n in model.graph]
    assert "Shape" not in ops and "Gather" not in ops and ops.count("Slice") == 2
    for node in model.graph:
        if node.op_type == "Slice":
            assert all(ir.convenience.get_const_tensor(v) is not None for v in node.inputs[1:])
    ort_equal(proto, model)


def test_bounds_that_depend_on_runtime_values_stay():
    """A bound computed from an input tensor's values cannot be proven: nothing changes."""
    nodes = [
        helper.make_node("ReduceMax", ["K"], ["k"], keepdims=1),
        helper.make_node("Slice", ["X", "zero", "k", "axis"], ["Y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "axis"),
    ]
    proto = make_model(
        nodes,
        [tensor_info("X", ["N", 8, 4]), tensor_info("K", [1], TensorProto.INT64)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", None, 4])],
        inits,
    )
    model, fold = _run(proto)
    assert fold.rewrites == []
    assert [n.op_type for n in model.graph] == ["ReduceMax", "Slice"]
