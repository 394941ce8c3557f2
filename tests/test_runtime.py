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

import gconv_compile
from gconv_compile.errors import UserError
from gconv_compile.runtime import load, read_weights, runtime_dir, sidecar_path

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
