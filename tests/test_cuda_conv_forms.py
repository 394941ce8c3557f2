"""CUDA builds: grouped Convs with 2-4 wide groups in float16 run on tensor cores, grouped
(``cuda_plan`` finds the kernel a tile) or as a dense block-diagonal conv (small images); others
keep the CUDA-core grouped kernel; the report says which and why (issues #5, #13)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gconv_compile.build import compile


def _conv(tmp_path, *, group: int, per_group: int, dtype: str, size: int = 6):
    channels = group * per_group
    r = np.random.default_rng(0)
    weight = (r.standard_normal((channels, per_group, 3, 3)) / np.sqrt(9 * per_group)).astype(dtype)
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["Y"], name="gconv", group=group, pads=[1] * 4)],
        "g",
        [helper.make_tensor_value_info("X", elem, [1, channels, size, size])],
        [helper.make_tensor_value_info("Y", elem, [1, channels, size, size])],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("group", "per_group", "dtype", "size", "form", "reason"),
    [
        (2, 64, "float16", 6, "dense-blockdiag", "estimated 0.27x"),
        (4, 64, "float16", 6, "dense-blockdiag", "estimated 0.54x"),
        (2, 64, "float32", 6, "grouped-igemm", "estimated 2.00x"),
        (2, 16, "float16", 6, "grouped-igemm", "narrower than 64 channels"),
        (2, 64, "float16", 28, "grouped-tensorcore", "dense would do 2x its MACs"),
    ],
    ids=["fp16-g2-wide-6px", "fp16-g4-wide-6px", "fp32-g2-wide", "fp16-g2-narrow",
         "fp16-g2-wide-28px-tensor-cores"],
)  # fmt: skip
def test_cuda_picks_a_form_per_conv(tmp_path, group, per_group, dtype, size, form, reason):
    path = _conv(tmp_path, group=group, per_group=per_group, dtype=dtype, size=size)
    built = compile(path, "cuda", arch="sm_90", output=tmp_path / "m.so")
    forms = built.report.extra["conv_forms"]
    assert [(f["node"], f["form"]) for f in forms] == [("gconv", form)]
    assert reason in forms[0]["why"]
    expanded = [r for r in built.report.rewrites if r.pass_name == "expand-grouped-conv"]
    assert bool(expanded) == (form == "dense-blockdiag")
    if expanded:  # the dense rewrite was checked against the input in onnxruntime
        assert built.report.check is not None and built.report.check.passed
    else:
        assert built.report.check is None and "nothing rewritten" in built.report.check_note
    schedules = {s["schedule"] for s in built.report.extra["schedules"]}
    assert ("cuda-grouped-tensorcore" in schedules) == (form == "grouped-tensorcore")


def test_dense_form_computes_the_same_in_onnxruntime(tmp_path):
    """The block-diagonal rewrite itself is checked by onnxruntime like every rewrite."""
    from gconv_compile.passes import ExpandGroupedConv

    from gconv_compile.model_io import load_model
    from gconv_compile.pipeline import run_checked
    from gconv_compile.report import Report
    from gconv_compile.targets import choose_cuda_conv_forms

    path = _conv(tmp_path, group=2, per_group=64, dtype="float32")
    loaded = load_model(path)
    assert choose_cuda_conv_forms(loaded.model)[0]["form"] == "grouped-igemm"  # float32

    def dense(model):
        expand = ExpandGroupedConv(mode="dense")
        expand(model)
        return expand.rewrites, expand.skips

    report = Report("compile")
    run_checked(loaded, dense, report)
    assert report.check is not None and report.check.passed


def test_only_the_convs_chosen_dense_are_expanded():
    """A group-8 conv beside a dense-chosen group-2 one keeps its grouped kernel."""
    import onnx_ir as ir

    from gconv_compile.targets import passes_for_target

    r = np.random.default_rng(1)
    weights = {
        "W2": (r.standard_normal((128, 64, 1, 1)) / 8).astype("float16"),
        "W8": (r.standard_normal((128, 16, 1, 1)) / 4).astype("float16"),
    }
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W2"], ["H"], name="g2", group=2),
         helper.make_node("Conv", ["H", "W8"], ["Y"], name="g8", group=8)],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [1, 128, 4, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [1, 128, 4, 4])],
        [onnx.numpy_helper.from_array(w, name) for name, w in weights.items()],
    )  # fmt: skip
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    plan = passes_for_target("compile", "cuda")
    rewrites, skips = plan(model)
    assert [(f["node"], f["form"]) for f in plan.conv_forms] == [("g2", "dense-blockdiag")]
    assert [r.anchor for r in rewrites if r.pass_name == "expand-grouped-conv"] == ["g2"]
    assert [(s.anchor, s.reason) for s in skips if s.anchor == "g8"] == [
        ("g8", "grouped kernel kept: dense pays only for 2-4 wide groups")
    ]
    kept = [n for n in model.graph if n.name == "g8"]
    assert len(kept) == 1 and kept[0].attributes["group"].as_int() == 8
