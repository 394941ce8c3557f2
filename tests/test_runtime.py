"""gconv_compile.runtime: libraries run with TVM's runtime alone, outputs as onnxruntime's."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, tensor_info
from grouped_models import grouped_conv, ort_run
from onnx import helper
from test_gpu_kit import BARE_PYTHON, bare_python

import gconv_compile
from gconv_compile.errors import UserError
from gconv_compile.library import embed_cuda_binaries, write_bundle
from gconv_compile.runtime import (
    find_cudart,
    find_nvcc,
    load,
    read_weights,
    runtime_dir,
    sidecar_path,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conv_library(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("runtime")
    model = grouped_conv(group=4, channels_in=8, channels_out=8, spatial=(9, 9), batch=2)
    onnx.save(model, folder / "conv.onnx")
    gconv_compile.compile(folder / "conv.onnx", "llvm", output=folder / "conv.so", check=False)
    return folder / "conv.onnx", folder / "conv.so"


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    return {"X": np.random.default_rng(seed).standard_normal((2, 8, 9, 9)).astype(np.float32)}


def test_load_runs_like_onnxruntime(conv_library):
    model, library = conv_library
    lib = load(library)
    assert lib.input_names == ["X"] and lib.output_names == ["Y", "C"] and lib.device == "cpu"
    assert lib.threads == len(os.sched_getaffinity(0))
    expected = ort_run(onnx.load(model), _feeds())
    got = lib.run(_feeds())
    for name in ("Y", "C"):
        assert np.std(expected[name]) > 0
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5)


def test_load_by_a_bare_file_name_from_its_folder(conv_library, monkeypatch):
    """dlopen searches the library path, not the working folder, for a name without a slash."""
    model, library = conv_library
    monkeypatch.chdir(library.parent)
    lib = load(library.name)
    assert lib.path == library and lib.path.is_absolute()
    monkeypatch.chdir("/")  # the library stays usable wherever the process goes next
    got = lib.run(_feeds(2))
    np.testing.assert_allclose(got["Y"], ort_run(onnx.load(model), _feeds(2))["Y"], rtol=1e-4,
                               atol=1e-5)  # fmt: skip


def test_threads_option_sizes_the_pool(conv_library):
    assert load(conv_library[1], threads=1).threads == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda side: side.unlink(), "no conv.so.json beside it"),
        (lambda side: side.write_text("{}"), "not a gconv-compile library description"),
        (
            lambda side: side.write_text(
                json.dumps({**json.loads(side.read_text()), "library_sha256": "0" * 64})
            ),
            "describes another library",
        ),
    ],
    ids=["sidecar-missing", "sidecar-not-ours", "sidecar-of-another-library"],
)
def test_bad_sidecar_is_one_clear_error(conv_library, tmp_path, change, message):
    library = tmp_path / "conv.so"
    shutil.copy(conv_library[1], library)
    shutil.copy(sidecar_path(conv_library[1]), sidecar_path(library))
    change(sidecar_path(library))
    with pytest.raises(UserError, match=message):
        load(library)


def test_wrong_input_dtype_is_refused(conv_library):
    with pytest.raises(UserError, match="dtype float64"):
        load(conv_library[1]).run({"X": _feeds()["X"].astype(np.float64)})


# ------------------------------------------------------------------------------- weights file


def _weights_as_inputs_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    r = np.random.default_rng(3)
    weights = {
        "W": (r.standard_normal((6, 2, 3, 3)) / 4).astype(np.float32),
        "B": r.standard_normal(6).astype(np.float32),
    }
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["Y"], group=2, pads=[1] * 4)]
    inputs = [tensor_info("X", [1, 4, 7, 7]), tensor_info("W", [6, 2, 3, 3]), tensor_info("B", [6])]
    return make_model(nodes, inputs, [tensor_info("Y", [1, 6, 7, 7])], []), weights


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    header, offset, body = {}, 0, b""
    for name, array in arrays.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}  # fmt: skip
        offset, body = offset + len(data), body + data
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_weights_file_is_read_at_load(tmp_path, suffix):
    model, weights = _weights_as_inputs_model()
    onnx.save(model, tmp_path / "m.onnx")
    gconv_compile.compile(tmp_path / "m.onnx", "llvm", output=tmp_path / "m.so", check=False)
    side = json.loads(sidecar_path(tmp_path / "m.so").read_text())
    side["inputs"] = side["inputs"][:1]
    side["weights"] = {"file": f"m{suffix}", "names": ["W", "B"]}
    sidecar_path(tmp_path / "m.so").write_text(json.dumps(side))
    if suffix == ".npz":
        np.savez(tmp_path / "m.npz", **weights)
    else:
        _write_safetensors(tmp_path / "m.safetensors", weights)
    assert set(read_weights(tmp_path / f"m{suffix}")) == {"W", "B"}
    x = np.random.default_rng(4).standard_normal((1, 4, 7, 7)).astype(np.float32)
    lib = load(tmp_path / "m.so")
    assert lib.input_names == ["X"]
    expected = ort_run(model, {"X": x, **weights})["Y"]
    np.testing.assert_allclose(lib.run({"X": x})["Y"], expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- no compiler

# Any import of the tvm package fails; the runtime library comes from a folder that holds only
# libtvm_runtime.so, so nothing can load libtvm_compiler.so.
NO_COMPILER = textwrap.dedent(
    """
    import sys
    import importlib.abc

    class NoTVM(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tvm" or name.startswith("tvm."):
                raise ImportError(f"{name} is blocked: runtime-only test")
            return None

    sys.meta_path.insert(0, NoTVM())
    import numpy as np
    from gconv_compile.runtime import load

    lib = load(sys.argv[1])
    feeds = dict(np.load(sys.argv[2]))
    outputs = lib.run(feeds)
    np.savez(sys.argv[3], **outputs)
    maps = open("/proc/self/maps").read()
    assert "libtvm_compiler" not in maps, "the compiler library was loaded"
    assert "libtvm_runtime.so" in maps
    assert not any(m == "tvm" or m.startswith("tvm.") for m in sys.modules), "tvm was imported"
    print("runtime-only ok", lib.threads)
    """
)


def test_load_works_without_the_compiler_library(conv_library, tmp_path):
    model, library = conv_library
    lib_dir = tmp_path / "tvm_runtime"
    lib_dir.mkdir()
    shutil.copy(runtime_dir() / "libtvm_runtime.so", lib_dir)
    np.savez(tmp_path / "feeds.npz", **_feeds(1))
    env = {**os.environ, "GCONV_TVM_RUNTIME_DIR": str(lib_dir)}
    done = subprocess.run(
        [sys.executable, "-c", NO_COMPILER, str(library), str(tmp_path / "feeds.npz"),
         str(tmp_path / "out.npz")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "runtime-only ok" in done.stdout
    expected = ort_run(onnx.load(model), _feeds(1))
    got = np.load(tmp_path / "out.npz")
    for name in ("Y", "C"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- compile options

WHEELS = ROOT / "build" / "wheels"


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """Example 01 (folds three blocks) on disk, an input, and onnxruntime's output for it."""
    sys.path.insert(0, str(ROOT / "examples" / "01_chunked_conv"))
    import model as example01  # the example's own model script

    folder = tmp_path_factory.mktemp("example")
    proto = example01.build_model()
    onnx.save(proto, folder / "ex.onnx")
    x = np.random.default_rng(6).standard_normal((2, 3, 28, 28)).astype(np.float32)
    return folder / "ex.onnx", x, ort_run(proto, {"image": x})["logits"]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_compile_weights_file_keeps_the_weights_outside(example, tmp_path, suffix):
    path, x, expected = example
    compiled = gconv_compile.compile(
        path, "llvm", output=tmp_path / "m.so", weights_file=tmp_path / f"m{suffix}"
    )
    side = json.loads(sidecar_path(tmp_path / "m.so").read_text())
    assert side["weights"]["file"] == f"m{suffix}" and side["inputs"][0]["name"] == "image"
    assert len(side["weights"]["names"]) == len(read_weights(tmp_path / f"m{suffix}"))
    assert compiled.report.rewrites, "the fold ran before the weights were taken out"
    for got in (load(tmp_path / "m.so").run({"image": x}), compiled.runner().run({"image": x})):
        np.testing.assert_allclose(got["logits"], expected, rtol=1e-4, atol=1e-5)
    (tmp_path / f"m{suffix}").unlink()
    with pytest.raises(UserError, match="weights file is missing"):
        load(tmp_path / "m.so")


@pytest.mark.parametrize(
    "weights, message",
    [("w.bin", "must end in .npz or .safetensors"), ("sub/w.npz", "must be in the library's")],
)
def test_weights_file_bad_names_are_refused(example, tmp_path, weights, message):
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match=message):
        gconv_compile.compile(
            example[0], "llvm", output=tmp_path / "m.so", weights_file=tmp_path / weights
        )


# ------------------------------------------------------------------------------- CUDA binary

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="no nvcc to compile CUDA C at build")
FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # fatbinary header, little-endian 0xBA55ED50
EM_CUDA = 190


def _cuda_elf_archs(data: bytes) -> list[int]:
    """The SM version of every CUDA ELF (e_machine 190) embedded in ``data``."""
    archs, at = [], data.find(b"\x7fELF", 1)
    while at != -1:
        if data[at + 4] == 2 and struct.unpack_from("<H", data, at + 18)[0] == EM_CUDA:
            archs.append((struct.unpack_from("<I", data, at + 48)[0] >> 8) & 0xFF)
        at = data.find(b"\x7fELF", at + 1)
    return archs


@pytest.fixture(scope="module")
def cuda_libraries(example, tmp_path_factory) -> dict[str, Path]:
    """Example 01 for sm_90 compiled with nvcc (fatbin embedded) and without (CUDA C)."""
    if find_nvcc() is None:
        pytest.skip("no nvcc to compile CUDA C at build time")
    folder = tmp_path_factory.mktemp("cuda")
    gconv_compile.compile(example[0], "cuda", arch="sm_90", output=folder / "c.so", check=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gconv_compile.build.find_nvcc", lambda: None)
        gconv_compile.compile(example[0], "cuda", arch="sm_90", output=folder / "src.so",
                              check=False)  # fmt: skip
    return {"embedded": folder / "c.so", "source": folder / "src.so"}


@needs_nvcc
def test_cuda_build_embeds_a_fatbin_for_its_arch(cuda_libraries):
    library = cuda_libraries["embedded"]
    side = json.loads(sidecar_path(library).read_text())
    assert side["cuda_binary"] == {"format": "fatbin", "arch": "sm_90", "compiler": "nvcc",
                                   "embedded": True, "file": "c.so"}  # fmt: skip
    assert "cuda_note" not in side
    assert sorted(p.name for p in library.parent.iterdir()) == ["c.so", "c.so.json", "src.so",
                                                                "src.so.json"]  # fmt: skip
    data = library.read_bytes()
    assert FATBIN_MAGIC in data and _cuda_elf_archs(data) == [90]
    assert b"__global__" not in data, "the CUDA C was replaced by the fatbin"
    source = cuda_libraries["source"].read_bytes()
    assert b"__global__" in source and FATBIN_MAGIC not in source and not _cuda_elf_archs(source)
    assert (
        "no nvcc at build time"
        in json.loads(sidecar_path(cuda_libraries["source"]).read_text())["cuda_note"]
    )


@needs_nvcc
def test_bundle_of_a_cuda_library_needs_no_binary_beside_it(cuda_libraries, tmp_path):
    if not any(WHEELS.glob("apache_tvm_ffi-*-cp312-*.whl")):
        pytest.skip(f"no tvm-ffi cp312 wheel in {WHEELS} (make gpu-kit downloads it)")
    write_bundle(cuda_libraries["embedded"], tmp_path / "b", wheels=WHEELS)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "c.so", "c.so.json", "python", "runtime"
    ]  # fmt: skip
    assert (tmp_path / "b" / "runtime" / "libtvm_runtime_cuda.so").is_file()


# A GPU-less process loads TVM's CUDA runtime module against a stub of the driver (the 9 driver
# functions libtvm_runtime_cuda.so links, each saying "no device"); the JIT callback fails.
STUB_DRIVER = """
int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
int cuGetErrorString(int e, const char **s) { *s = "no device (test stub)"; return 0; }
""" + "".join(
    f"int {name}(void) {{ return 100; }}\n"
    for name in ("cuDeviceGetName", "cuFuncSetAttribute", "cuLaunchKernelEx", "cuModuleGetFunction",
                 "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled")
)  # fmt: skip
LOAD_WITHOUT_JIT = """
import sys, tvm_ffi
from gconv_compile import runtime
def jit(*_):
    raise RuntimeError("JIT-CALLBACK-CALLED")
runtime.load_runtime(cuda=True)
tvm_ffi.register_global_func("runtime.GetCudaDeviceCount", lambda: 1, override=True)
runtime._register_cuda_compile = lambda *_: tvm_ffi.register_global_func(
    "tvm_callback_cuda_compile", jit, override=True)
try:
    runtime.load(sys.argv[1])
except Exception as error:
    print(error)
"""


@needs_nvcc
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the driver stub")
def test_embedded_fatbin_loads_without_asking_for_jit(cuda_libraries, tmp_path):
    if find_cudart(runtime_dir()) is None:
        pytest.skip("no libcudart.so.13 for TVM's CUDA runtime (set CUDA_PATH)")
    (tmp_path / "stub.c").write_text(STUB_DRIVER)
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    str(tmp_path / "libcuda.so.1"), str(tmp_path / "stub.c")], check=True)  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    said = {}
    for kind, library in cuda_libraries.items():
        done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_JIT, library.name],
                              capture_output=True, text=True, env=env, cwd=library.parent,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        said[kind] = done.stdout
    # The CUDA C library asks for JIT when TVM's runtime creates its CUDA module...
    assert "JIT-CALLBACK-CALLED" in said["source"]
    # ...the fatbin library gets past that, to the first device allocation (no GPU here).
    assert "JIT-CALLBACK-CALLED" not in said["embedded"]
    assert "cannot start the model's VM: CUDA Runtime Error" in said["embedded"]


def test_embed_cuda_binaries_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="size header"):
        embed_cuda_binaries(b"\x00" * 16, [], "fatbin")
    cuda = _packed(_packed(b"cuda") + b"INFO" + _packed(b"__global__ void k() {}"))
    body = _packed_u64s([0, 1]) + _packed_u64s([]) + _packed(b"cuda") + cuda
    blob = struct.pack("<Q", len(body)) + body
    with pytest.raises(ValueError, match="no compiled binary"):
        embed_cuda_binaries(blob, [("other source", b"BIN")], "fatbin")
    embedded = embed_cuda_binaries(blob, [("__global__ void k() {}", b"BIN")], "fatbin")
    expected = _packed_u64s([0, 1]) + _packed_u64s([]) + _packed(b"cuda")
    expected += _packed(_packed(b"fatbin") + b"INFO" + _packed(b"BIN"))
    assert embedded == struct.pack("<Q", len(expected)) + expected


def _packed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _packed_u64s(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values) + 1}Q", len(values), *values)


def test_bundle_runs_under_a_bare_python(example, tmp_path):
    """`gconv-compile bundle`, then the bundle alone under Python 3.12 with numpy only."""
    bare_python()
    path, x, expected = example
    gconv_compile.compile(path, "llvm", output=tmp_path / "m.so", weights_file=tmp_path / "m.npz")
    cli = [sys.executable, "-m", "gconv_compile", "bundle", str(tmp_path / "m.so"), "-o",
           str(tmp_path / "b"), "--wheels", str(WHEELS)]  # fmt: skip
    done = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "MiB for Python 3.12" in done.stdout
    wheel = next((tmp_path / "b" / "runtime").glob("*.whl"))
    subprocess.run([str(BARE_PYTHON), "-m", "zipfile", "-e", str(wheel), str(tmp_path / "site")],
                   check=True)  # fmt: skip
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np; from gconv_compile.runtime import load; "
              f"np.save(sys.argv[2], load(sys.argv[1]).run({{'image': np.load('{tmp_path}/x.npy')}})"
              "['logits']); assert not any(m.startswith('tvm.') or m == 'tvm' for m in sys.modules)")  # fmt: skip
    env = {"PATH": os.environ["PATH"], "PIP_NO_INDEX": "1", "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1",
           "PYTHONPATH": f"{tmp_path}/b/python:{tmp_path}/site",
           "GCONV_TVM_RUNTIME_DIR": f"{tmp_path}/b/runtime"}  # fmt: skip
    run = subprocess.run([str(BARE_PYTHON), "-c", script, f"{tmp_path}/b/m.so", f"{tmp_path}/y.npy"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["llvm", "cuda"])
def test_input_names_that_are_not_c_identifiers_build(tmp_path, target):
    """ShuffleNet's input 'gpu_0/data_0' once became the CUDA parameter 'gpu_0/data_0_ptr'."""
    if target == "cuda" and find_nvcc() is None:
        pytest.skip("no nvcc to compile the CUDA C at build time")
    model = grouped_conv(group=2, channels_in=4, channels_out=4, spatial=(6, 6), batch=1)
    for value in [*model.graph.input, *model.graph.output]:
        value.name = {"X": "gpu_0/data_0", "Y": "out/y"}.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = ["gpu_0/data_0" if n == "X" else n for n in node.input]
        node.output[:] = ["out/y" if n == "Y" else n for n in node.output]
    compiled = gconv_compile.compile(model, target, output=tmp_path / "m.so", arch=None)
    assert compiled.info.cuda_note is None
    assert [s.name for s in compiled.info.inputs] == ["gpu_0/data_0"]
    if target == "llvm":
        x = np.random.default_rng(7).standard_normal((1, 4, 6, 6)).astype(np.float32)
        got = load(tmp_path / "m.so").run({"gpu_0/data_0": x})
        expected = ort_run(model, {"gpu_0/data_0": x})
        np.testing.assert_allclose(got["out/y"], expected["out/y"], rtol=1e-4, atol=1e-5)
    else:
        assert compiled.info.cuda_binary["arch"] == "sm_80"


def test_cli_compile_weights_file_and_bundle_errors(example, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gconv_compile", *args],
                              capture_output=True, text=True, cwd=ROOT)  # fmt: skip

    done = cli("compile", str(example[0]), "-o", str(tmp_path / "m.so"),
               "--weights-file", str(tmp_path / "m.npz"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"weights  45 tensors in {tmp_path / 'm.npz'}" in done.stdout
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for args, message in [
        (["bundle", str(tmp_path / "m.so"), "-o", str(tmp_path / "full")], "not an empty folder"),
        (["bundle", str(tmp_path / "m.so"), "-o", str(tmp_path / "b"), "--python", "3"],
         "expected MAJOR.MINOR"),
        (["bundle", str(tmp_path / "none.so"), "-o", str(tmp_path / "b")], "no such library"),
    ]:  # fmt: skip
        done = cli(*args)
        assert done.returncode == 2 and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
