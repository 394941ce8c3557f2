"""TVM compile for llvm and cuda: libraries that load in a fresh process and match onnxruntime.

Every fixture model is compiled once per module (TVM builds are the slow part) and verified
against onnxruntime on the original model with seeded random inputs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, split_conv_concat, tensor_info
from grouped_models import grouped_conv, zoo_model
from onnx import TensorProto, helper, numpy_helper

from gconv_compile.build import compile
from gconv_compile.errors import UserError
from gconv_compile.library import CUDA_RUNTIME_NEEDS, load_library, sidecar_path
from gconv_compile.reference import run_ort_model
from gconv_compile.targets import cuda_available, host_llvm_target
from gconv_compile.verify import verify


def _fp16_grouped_conv() -> onnx.ModelProto:
    r = np.random.default_rng(3)
    w = (r.standard_normal((8, 4, 3, 3)) / 6).astype(np.float16)
    node = helper.make_node("Conv", ["X", "W"], ["Y"], group=2, pads=[1, 1, 1, 1])
    return make_model(
        [node],
        [tensor_info("X", ["N", 8, 6, 6], TensorProto.FLOAT16)],
        [tensor_info("Y", ["N", 8, 6, 6], TensorProto.FLOAT16)],
        [numpy_helper.from_array(w, "W")],
    )


# id -> (model builder, blocks the fold should rewrite)
MODELS = {
    "split-conv-concat": (lambda: split_conv_concat(), 1),
    "slice-conv-relu-concat": (lambda: split_conv_concat(split_form="slice", activation="Relu"), 1),
    "split-4-conv1d": (
        lambda: split_conv_concat(channels=8, groups=4, kernel=(3,), spatial=(9,)),
        1,
    ),
    "grouped-conv-two-outputs": (lambda: grouped_conv(group=2), 0),
    "depthwise-conv": (lambda: grouped_conv(group=8, channels_in=8, channels_out=8), 0),
    "grouped-convtranspose-stride2": (
        lambda: grouped_conv(group=2, transpose=True, attrs={"strides": [2, 2]}),
        0,
    ),
    "split-convtranspose-concat": (lambda: split_conv_concat(transpose=True), 1),
    "static-batch": (lambda: split_conv_concat(batch=1), 1),
    "float16-grouped-conv": (_fp16_grouped_conv, 0),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path, object]]:
    """id -> (model path, llvm library, CompiledModel), each built once."""
    folder = tmp_path_factory.mktemp("compile")
    out = {}
    for name, (make, _) in MODELS.items():
        model_path = folder / f"{name}.onnx"
        onnx.save(make(), model_path)
        library = folder / f"{name}.so"
        out[name] = (model_path, library, compile(model_path, "llvm", output=library))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_llvm_library_matches_onnxruntime(built, name):
    model_path, library, compiled = built[name]
    assert library.is_file() and sidecar_path(library).is_file()
    assert len(compiled.report.rewrites) == MODELS[name][1]
    result = verify(model_path, library=library, seeds=(0, 1))
    assert result.passed, "\n".join(result.lines())
    assert result.check.reference.startswith("onnxruntime CPU EP")
    # Not vacuous: the library's outputs vary with the input (a constant would hide bugs).
    runner = load_library(library)
    feeds = [
        {s.name: np.random.default_rng(seed).standard_normal([d if isinstance(d, int) else 2
                                                              for d in s.shape]).astype(s.dtype)
         for s in runner.info.inputs}
        for seed in (0, 1)
    ]  # fmt: skip
    first, second = (runner.run(f) for f in feeds)
    assert all(np.std(v) > 0 and not np.array_equal(v, second[k]) for k, v in first.items())


def test_sidecar_records_names_symbolic_shapes_target_and_fingerprints(built):
    model_path, library, _ = built["grouped-conv-two-outputs"]
    info = json.loads(sidecar_path(library).read_text())
    assert info["format"] == "gconv-compile-library/1"
    assert info["inputs"] == [{"name": "X", "shape": ["N", 8, 7, 7], "dtype": "float32"}]
    assert [o["name"] for o in info["outputs"]] == ["Y", "C"]
    assert info["target"] == host_llvm_target()
    assert "native" not in json.dumps(info["target"])
    import hashlib

    assert info["model_sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert info["library_sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()


def test_library_runs_in_a_fresh_process_at_several_batch_sizes(built, tmp_path):
    """Only tvm.runtime.load_module + relax.VirtualMachine; the batch dim stayed symbolic."""
    model_path, library, _ = built["split-conv-concat"]
    model = onnx.load(model_path)
    import onnx_ir as ir

    rng = np.random.default_rng(7)
    feeds = [{"X": rng.standard_normal((b, 8, 6, 6)).astype(np.float32)} for b in (1, 3, 5)]
    expected = run_ort_model(ir.serde.deserialize_model(model), feeds)
    np.savez(tmp_path / "x.npz", *[f["X"] for f in feeds])
    script = textwrap.dedent(
        f"""
        import numpy as np, tvm
        from tvm import relax
        vm = relax.VirtualMachine(tvm.runtime.load_module({str(library)!r}), tvm.cpu())
        xs = np.load({str(tmp_path / "x.npz")!r})
        np.savez({str(tmp_path / "y.npz")!r},
                 *[vm["main"](tvm.runtime.tensor(xs[k])).numpy() for k in sorted(xs.files)])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    got = np.load(tmp_path / "y.npz")
    for index, ref in enumerate(expected):
        y = got[f"arr_{index}"]
        assert y.shape == ref["Y"].shape
        np.testing.assert_allclose(y, ref["Y"], rtol=1e-4, atol=1e-5)


def test_in_memory_runner_takes_other_batch_sizes_and_rejects_wrong_shapes(built):
    _, _, compiled = built["split-conv-concat"]
    runner = compiled.runner()
    x = np.random.default_rng(0).standard_normal((4, 8, 6, 6)).astype(np.float32)
    assert runner.run({"X": x})["Y"].shape == (4, 8, 6, 6)
    with pytest.raises(UserError, match="shape"):
        runner.run({"X": x[:, :4]})
    with pytest.raises(UserError, match="dtype"):
        runner.run({"X": x.astype(np.float64)})


def test_llvm_emit_source_writes_ir_and_assembly(tmp_path):
    compiled = compile(
        split_conv_concat(), "llvm", output=tmp_path / "m.so", emit_source=tmp_path / "src"
    )
    names = sorted(p.name for p in compiled.sources)
    assert names == ["m.ll", "m.s"]
    assert "define " in (tmp_path / "src" / "m.ll").read_text()
    assert ".text" in (tmp_path / "src" / "m.s").read_text()


def test_compile_without_optimize_leaves_the_split_branches(tmp_path):
    compiled = compile(split_conv_concat(), "llvm", optimize=False)
    assert compiled.report.rewrites == [] and compiled.info.optimized is False
    result = verify(split_conv_concat(), target="llvm", optimize=False, seeds=(0,))
    assert result.passed


def test_python_api_compile_is_callable_from_the_package(tmp_path):
    import gconv_compile.build  # noqa: F401  (binding the submodule must not hide the function)

    compiled = gconv_compile.compile(split_conv_concat(seed=2), target="llvm")
    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    assert compiled.runner().run({"X": x})["Y"].shape == (2, 8, 6, 6)


def test_unsupported_op_is_a_user_error_and_writes_nothing(tmp_path):
    nodes = [helper.make_node("Celu", ["X"], ["Y"])]
    model = make_model(nodes, [tensor_info("X", [1, 4])], [tensor_info("Y", [1, 4])])
    with pytest.raises(UserError, match="Celu"):
        compile(model, "llvm", output=tmp_path / "m.so")
    assert list(tmp_path.iterdir()) == []


OUTPUT_SHAPE_CASES = {
    # natural 15x15; H exact, W one smaller (pads), under NOTSET and SAME_UPPER
    "pads-notset": {"strides": [2, 2], "output_shape": [15, 14]},
    "pads-same-upper": {"strides": [2, 2], "output_shape": [14, 13], "auto_pad": "SAME_UPPER"},
    # larger than natural: becomes output_padding
    "output-padding": {"strides": [3, 2], "output_shape": [22, 16]},
}


@pytest.mark.parametrize("case", list(OUTPUT_SHAPE_CASES))
def test_convtranspose_output_shape_is_honoured(case):
    """TVM ignores output_shape; compile turns it into pads/output_padding first."""
    model = grouped_conv(group=2, transpose=True, attrs=OUTPUT_SHAPE_CASES[case])
    result = verify(model, target="llvm", seeds=(0,))
    assert result.passed, "\n".join(result.lines())
    wanted = OUTPUT_SHAPE_CASES[case]["output_shape"]
    assert all(stat.shape[2:] == wanted for stat in result.check.outputs)


def test_convtranspose_output_shape_needs_a_static_input_size():
    model = grouped_conv(
        group=2, transpose=True, spatial=("H", "W"),
        attrs={"strides": [2, 2], "output_shape": [15, 14]},
    )  # fmt: skip
    with pytest.raises(UserError, match="bind it with --shape"):
        compile(model, "llvm", check=False)
    compiled = compile(model, "llvm", check=False, shapes={"X": [1, 8, 7, 7]})
    assert compiled.info.inputs[0].shape == [1, 8, 7, 7]


# ------------------------------------------------------------------------------- cuda


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda")
    model_path = folder / "m.onnx"
    onnx.save(split_conv_concat(), model_path)
    compiled = compile(
        model_path, "cuda", arch="sm_80", output=folder / "m.so", emit_source=folder / "src"
    )
    return folder, compiled


def test_cuda_build_needs_no_gpu_and_writes_library_and_cuda_source(cuda_build):
    folder, compiled = cuda_build
    assert (folder / "m.so").stat().st_size > 0
    info = json.loads((folder / "m.so.json").read_text())
    assert info["target"]["kind"] == "cuda" and info["target"]["arch"] == "sm_80"
    assert info["runtime_needs"] == CUDA_RUNTIME_NEEDS
    source = (folder / "src" / "m.cu").read_text()
    assert "__global__" in source
    assert [p.name for p in compiled.sources] == ["m.cu"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_emitted_cuda_source_compiles_with_nvcc(cuda_build, tmp_path):
    folder, _ = cuda_build
    done = subprocess.run(
        ["nvcc", "-arch=sm_80", "-cubin", "-o", str(tmp_path / "m.cubin"),
         str(folder / "src" / "m.cu")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.cubin").stat().st_size > 0


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_loading_a_cuda_library_without_gpu_says_so(cuda_build):
    folder, _ = cuda_build
    with pytest.raises(UserError, match="needs a GPU"):
        load_library(folder / "m.so")


@pytest.mark.skipif(not cuda_available(), reason="no GPU")
def test_cuda_library_matches_onnxruntime_on_gpu(cuda_build):
    folder, _ = cuda_build
    result = verify(folder / "m.onnx", library=folder / "m.so")
    assert result.passed, "\n".join(result.lines())


# ------------------------------------------------------------------------------- zoo

ZOO_FAST = ["light_shufflenet"]
ZOO_ALL = ["light_shufflenet", "light_bvlc_alexnet", "light_squeezenet", "light_inception_v1"]


def _zoo_case(name: str, tmp_path: Path, seeds, cuda: bool) -> None:
    path = tmp_path / f"{name}.onnx"
    onnx.save(zoo_model(name), path)
    compile(path, "llvm", output=tmp_path / f"{name}.so", check=False)
    result = verify(path, library=tmp_path / f"{name}.so", seeds=seeds)
    assert result.passed, "\n".join(result.lines())
    if cuda:
        built = compile(
            path, "cuda", arch="sm_80", output=tmp_path / f"{name}_cuda.so", check=False
        )
        assert built.library.stat().st_size > 0


@pytest.mark.parametrize("name", ZOO_FAST)
def test_zoo_model_compiles_and_verifies(name, tmp_path):
    """ShuffleNet v1 (grouped convs, re-randomised weights) matches onnxruntime on llvm."""
    _zoo_case(name, tmp_path, seeds=(0,), cuda=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_ALL)
def test_zoo_model_compiles_and_verifies_slow(name, tmp_path):
    """All four light zoo models: llvm matches onnxruntime on 3 seeds; the CUDA build succeeds."""
    _zoo_case(name, tmp_path, seeds=(0, 1, 2), cuda=True)
