"""int8 models made by onnxruntime's ``quantize_static`` compile for llvm and verify (issue #11).

QDQ files (per channel ``_qdq_pc``, per tensor ``_qdq_pt``) import into TVM as they are;
QOperator files (``_qop``: QLinearConv, com.microsoft QLinearAdd/QLinearConcat/
QLinearAveragePool) import after :class:`~gconv_compile.passes.LowerQOperatorToQDQ`, which
``passes_for_target("import", ...)`` runs before every build. Each case compiles with the check
on (the fold checked in onnxruntime) and ``verify`` compares the library with onnxruntime on the
original file under the product's calibrated rule. The outputs are floats (each file ends in a
DequantizeLinear), so a flipped rounding tie anywhere would show as a whole quantization step
and fail; the builds measured bit-identical to onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from gconv_compile import optimize
from gconv_compile.build import compile
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
    assert result.passed, [s.to_dict() for s in result.outputs]
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
    if name.endswith("_qop"):  # the fold does not see QLinearConcat blocks (yet): nothing to check
        assert check is None or check.passed
    else:  # the branchy grouped convs are folded, and the fold is checked in onnxruntime
        assert built.report.rewrites and check is not None and check.passed
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
