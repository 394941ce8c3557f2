"""int8 models made by onnxruntime's ``quantize_static`` compile for llvm and verify (issue #11).

QDQ files (per channel ``_qdq_pc``, per tensor ``_qdq_pt``) import into TVM as they are;
QOperator files (``_qop``: QLinearConv, com.microsoft QLinearAdd/QLinearConcat/
QLinearAveragePool) import after :class:`~gconv_compile.passes.LowerQOperatorToQDQ`, which
``compile``'s plan runs first (then their blocks fold like QDQ ones) and
``passes_for_target("import", ...)`` before every build. Each case compiles with the check on
(the lowering and the fold checked in onnxruntime) and ``verify`` compares the library with onnxruntime on the
original file under the product's calibrated rule. The outputs are floats (each file ends in a
DequantizeLinear), so a flipped rounding tie anywhere would show as a whole quantization step
and fail; the builds measured bit-identical to onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import init, make_model, rng, tensor_info
from onnx import TensorProto, helper

from gconv_compile import optimize
from gconv_compile.build import compile
from gconv_compile.errors import UserError
from gconv_compile.reference import random_inputs, run_ort_model
from gconv_compile.verify import verify

FIXTURES = Path(__file__).parent / "fixtures" / "real"
QOPERATOR_OPS = ("QLinearConv", "QLinearAdd", "QLinearConcat", "QLinearAveragePool")
CASES = [
    "resnext_chunk_ts17_qdq_pc",
    "resnext_chunk_dynamo18_qdq_pt",
    "resnext_chunk_ts17_qop",
    "shufflenet_v1_dynamo18_qdq_pc",
    "shufflenet_v1_ts17_qdq_pt",
    "shufflenet_v1_dynamo18_qop",
    "mobilenetv2_ts17_qop",
]


def _verified(model_path: Path, library: Path, **options) -> None:
    result = verify(model_path, library=library.resolve(), seeds=(0, 1), **options)
    assert result.passed, [s.to_dict() for s in result.check.outputs]
    assert "onnxruntime" in result.reference and str(library.resolve()) in result.candidate


@pytest.mark.parametrize("name", CASES)
def test_int8_fixture_compiles_for_llvm_and_verifies(name, tmp_path):
    path = FIXTURES / f"{name}.onnx"
    ops = {node.op_type for node in onnx.load(path).graph.node}
    # The case is what its name says: QOperator ops only in the _qop files.
    assert bool(ops & set(QOPERATOR_OPS)) == name.endswith("_qop")
    library = tmp_path / f"{name}.so"
    built = compile(path, "llvm", output=library, seeds=(0,))
    assert library.stat().st_size > 0
    check = built.report.check
    assert check is not None and check.passed  # the fold (and the lowering) checked in ORT
    passes = {rewrite.pass_name for rewrite in built.report.rewrites}
    lowered = "lower-qoperator-to-qdq" in passes
    assert lowered == name.endswith("_qop")  # the compile report lists the lowering
    if "resnext_chunk" in name or "shufflenet" in name:  # branchy grouped convs: folded
        assert "fold-split-conv-concat" in passes
    _verified(path, library)


@pytest.mark.parametrize("name", ["resnext_native_ts17_qop", "resnext_native_ts17_qdq_pc"])
def test_generic_npu_optimized_int8_model_compiles_and_matches_the_original(name, tmp_path):
    """``optimize --target generic-npu`` splits the grouped conv (QLinearConv or QDQ Conv) into
    one conv per group; the result compiles, and the library matches onnxruntime both on the
    optimized file and on the file before optimize."""
    path = FIXTURES / f"{name}.onnx"
    optimized, report = optimize(path, target="generic-npu")
    if isinstance(optimized, ir.Model):  # a path gives the onnx-ir model
        optimized = ir.serde.serialize_model(optimized)
    assert report.rewrites and report.check is not None and report.check.passed
    groups = [attr.i for node in optimized.graph.node for attr in node.attribute
              if node.op_type in ("Conv", "QLinearConv") and attr.name == "group"]  # fmt: skip
    assert groups and all(group == 1 for group in groups)
    saved = tmp_path / "npu.onnx"
    onnx.save(optimized, saved)
    library = tmp_path / "npu.so"
    compile(saved, "llvm", output=library, optimize=False, seeds=(0,))
    _verified(saved, library)
    _verified(path, library, ignore_fingerprint=True)


def _every_lowered_op_model() -> onnx.ModelProto:
    """X -> Q -> QLinearMul -> QLinearSigmoid -> QLinearLeakyRelu -> QLinearAveragePool -> a,
    a -> QLinearGlobalAveragePool -> b, and ConvInteger of the quantized X -> c (int32)."""
    r = rng(8)
    # x in +-3.8, x*x in 0..9.8, sigmoid of that in 0.5..1: no scale saturates.
    scalar = {"s": np.float32(0.03), "z": np.uint8(128), "s2": np.float32(0.04),
              "z2": np.uint8(10), "s3": np.float32(0.004), "z3": np.uint8(0)}  # fmt: skip
    inits = [init(k, v) for k, v in scalar.items()]
    inits.append(init("w", r.integers(-20, 21, (4, 8, 3, 3)).astype(np.int8)))
    ms = {"domain": "com.microsoft"}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("QLinearMul", ["q", "s", "z", "q", "s", "z", "s2", "z2"], ["m"], **ms),
        helper.make_node("QLinearSigmoid", ["m", "s2", "z2", "s3", "z3"], ["g"], **ms),
        helper.make_node("QLinearLeakyRelu", ["g", "s3", "z3", "s3", "z3"], ["l"], alpha=0.2,
                         **ms),
        helper.make_node("QLinearAveragePool", ["l", "s3", "z3", "s3", "z3"], ["a"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], **ms),
        helper.make_node("QLinearGlobalAveragePool", ["a", "s3", "z3", "s3", "z3"], ["b"], **ms),
        helper.make_node("ConvInteger", ["q", "w", "z"], ["c"]),
    ]  # fmt: skip
    outputs = [tensor_info("a", [1, 8, 6, 6], TensorProto.UINT8),
               tensor_info("b", [1, 8, 1, 1], TensorProto.UINT8),
               tensor_info("c", [1, 4, 4, 4], TensorProto.INT32)]  # fmt: skip
    return make_model(nodes, [tensor_info("x", [1, 8, 6, 6])], outputs, inits,
                      extra_opsets=[helper.make_opsetid("com.microsoft", 1)])  # fmt: skip


def test_every_lowered_operator_imports_into_tvm_and_verifies(tmp_path):
    """The ops the fixtures lack (QLinearMul, QLinearSigmoid, QLinearLeakyRelu,
    QLinearGlobalAveragePool, ConvInteger) build too; integer outputs under the quantized rule
    (one step at a tie), ConvInteger's int32 exactly."""
    proto = _every_lowered_op_model()
    model = ir.serde.deserialize_model(proto)
    (reference,) = run_ort_model(model, [random_inputs(model, 0, {"x": [1, 8, 6, 6]})])
    assert all(len(np.unique(value)) > 4 for value in reference.values())  # nothing saturates
    library = tmp_path / "ops.so"
    compile(proto, "llvm", output=library, seeds=(0,))
    result = verify(proto, library=library, seeds=(0, 1))
    assert result.passed, [s.to_dict() for s in result.check.outputs]
    assert {s.name: s.max_abs_error for s in result.check.outputs}["c"] == 0


def test_an_import_refusal_other_than_output_shape_says_what_tvm_cannot_read(tmp_path):
    """A QOperator op the lowering refuses (an NHWC pool) stops the build with its own reason,
    not the ConvTranspose output_shape advice."""
    from test_passes_lower_qoperator import _channels_last_pool

    with pytest.raises(UserError) as caught:
        compile(_channels_last_pool(), "llvm", optimize=False)
    message = str(caught.value)
    assert "channels_last" in message and "TVM's ONNX importer cannot read it" in message
    assert "output_shape" not in message
