"""CPU builds: a classifier's constant weight is repacked into one panel per parallel task.

Legalised, the matmul reads ``b[k, j]``; each task computes ``P`` outputs and read ``P`` floats a
row apart per step. Packed ``[j // P, k, j % P]`` at compile time, each task streams its panel
contiguously (MobileNetV2's 1280x1000 with cold caches 79.5 -> 63.2 us alone). Weights passed as
inputs are never repacked. Every case against onnxruntime on seeded random inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from builders import init, make_model, rng, tensor_info
from onnx import helper
from test_schedules import F32, assert_close, compile_cpu, run_both

pytest.importorskip("tvm")

from gconv_compile.tvm_schedules.cpu_matmul import MatmulPacking  # noqa: E402


def classifier(k: int, n: int, *, op: str = "Gemm", trans_b: int = 1, batch: int = 1,
               weight_as_input: bool = False):  # fmt: skip
    r = rng(71)
    w = r.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inputs = [tensor_info("X", [batch, k])]
    inits = [init("B", r.standard_normal(n).astype(np.float32))]
    if weight_as_input:
        inputs.append(tensor_info("W", list(w.shape)))
    else:
        inits.append(init("W", w))
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=trans_b)]
    else:
        nodes = [helper.make_node("MatMul", ["X", "W"], ["M"]),
                 helper.make_node("Add", ["M", "B"], ["Y"])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("Y", F32, [batch, n])]
    return make_model(nodes, inputs, outputs, inits)


def _feeds(model, seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {
        v.name: r.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(
            np.float32
        )
        for v in model.graph.input
    }


@pytest.mark.parametrize(
    ("kwargs", "panel"),
    [(dict(k=544, n=1000), 40), (dict(k=64, n=1000, trans_b=0), 40),
     (dict(k=96, n=256, op="MatMul", trans_b=0), 128), (dict(k=128, n=1000, batch=3), 40)],
    ids=["gemm-transB", "gemm", "matmul-add", "batch-3"],
)  # fmt: skip
def test_constant_classifier_weight_is_packed_into_task_panels(kwargs, panel):
    model = classifier(**kwargs)
    vm, decisions = compile_cpu(model)
    (matmul,) = [d for d in decisions if "matmul" in d.function]
    assert f"packed into {panel}-output panels" in matmul.detail, matmul.line()
    out, ref = run_both(model, _feeds(model, seed=72), vm)
    assert_close(out, ref, F32)


def test_weight_passed_as_input_is_not_packed():
    model = classifier(256, 1000, weight_as_input=True, trans_b=0)
    vm, decisions = compile_cpu(model)
    (matmul,) = [d for d in decisions if "matmul" in d.function]
    assert "matmul 1000 outputs" in matmul.detail and "packed" not in matmul.detail, matmul.line()
    feeds = _feeds(model, seed=73)
    session_out, ref = run_both(model, feeds, vm)
    assert_close(session_out, ref, F32)


def test_packing_puts_each_output_panel_contiguously():
    w = np.arange(6 * 80, dtype=np.float32).reshape(6, 80)  # [k, j]
    packed = MatmulPacking("W", 40).pack(w)
    assert packed.shape == (2, 6, 40)
    for j in (0, 39, 40, 79):
        for k in (0, 5):
            assert packed[j // 40, k, j % 40] == w[k, j]
