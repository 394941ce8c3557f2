"""The GPU kit: its float16 rule, its model helpers, and its rehearsal under a bare Python 3.12.

The rehearsal test builds a small kit (llvm twins only), copies it outside the checkout and runs
``run.sh --rehearse`` with the interpreter of ``build/py312-bare`` (numpy, onnx, onnxruntime only;
``make gpu-kit-rehearse`` creates it) and ``PIP_NO_INDEX=1``. Where that venv or the tvm-ffi
wheel is missing (a fresh clone), the Makefile's own recipes make them, which needs pyenv's 3.12
and PyPI; else the tests skip. On this 2-vCPU machine the module took 34 s (2026-11-30,
``pytest --durations``: 16 s to build the three-model kit, 9 s per rehearsal), so it is not
marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "gpu_kit"), str(ROOT / "benchmarks")]

import kit_models  # noqa: E402

BARE_PYTHON = ROOT / "build" / "py312-bare" / "bin" / "python"
KIT_MODELS = ["resnext50", "s2_gconv_s2", "resnext_block_branchy"]


# ------------------------------------------------------------------------------- float16 rule


def test_float16_rule_passes_float16_rounding_and_fails_a_channel_swap():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((1, 256, 28, 28)).astype(np.float32) * 3
    length, layers = 288, 1
    atol, rtol = kit_models.float16_tolerance(reference, length, layers)

    def passes(candidate):
        return bool(np.all(np.abs(candidate - reference) <= atol + rtol * np.abs(reference)))

    rounded = reference.astype(np.float16).astype(np.float32)
    assert passes(rounded)
    swapped = reference[:, ::-1]  # a channel-order bug
    assert not passes(swapped)
    assert atol < 0.1 * np.sqrt(np.mean(reference**2))


def test_float16_copies_hold_the_same_values():
    model = kit_models.single_conv(kit_models.mobilenet_convs()[0])
    half = kit_models.to_float16(model)
    back = kit_models.to_float32(half)
    for name, value in kit_models.initializers(back).items():
        original = kit_models.initializers(model)[name]
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, original.astype(np.float16).astype(np.float32))


def test_generated_models_are_the_same_for_a_seed():
    spec = kit_models.generator_spec(kit_models.resnext_convs()[0])
    first, second = kit_models.generate(spec, "float32"), kit_models.generate(spec, "float32")
    assert first.SerializeToString() == second.SerializeToString()


# ------------------------------------------------------------------------------- rehearsal


def bare_python() -> Path:
    """build/py312-bare and the tvm-ffi cp312 wheel, made by the Makefile's own recipes when
    missing (``-o`` keeps make from reinstalling .venv); skips where they cannot be made."""
    targets = ["build/py312-bare/.installed", "build/wheels/.apache-tvm-ffi-cp312"]
    if not all((ROOT / t).is_file() for t in targets):
        try:
            done = subprocess.run(["make", "-o", ".venv/.installed", *targets],
                                  capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot run make for the bare Python 3.12: {exc}")
        if done.returncode != 0:
            pytest.skip(
                f"cannot make the bare Python 3.12 or fetch the wheel: {done.stderr[-300:]}"
            )
    return BARE_PYTHON


@pytest.fixture(scope="module")
def rehearsal_kit(tmp_path_factory) -> Path:
    """A kit of three models, built here and copied outside the checkout."""
    bare_python()
    built = tmp_path_factory.mktemp("kit-build") / "gpu-kit"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_gpu_kit.py"), "--no-cuda", "--out",
         str(built), "--only", *KIT_MODELS],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    copy = tmp_path_factory.mktemp("elsewhere") / "kit"
    shutil.copytree(built, copy)
    assert ROOT not in copy.parents
    return copy


def _rehearse(kit: Path, out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PYTHON=str(BARE_PYTHON))
    return subprocess.run(
        ["bash", str(kit / "run.sh"), "--rehearse", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=out.parent, timeout=600,
    )  # fmt: skip


def test_rehearsal_passes_from_a_copy_under_bare_python(rehearsal_kit, tmp_path):
    done = _rehearse(rehearsal_kit, tmp_path / "out")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert report["mode"] == "rehearse"
    names = {(m["name"], m["dtype"]) for m in report["models"]}
    assert ("resnext50", "float32") in names and ("s2_gconv_s2", "float16") in names
    for model in report["models"]:
        assert model["passed"] and model["tvm_ms"] > 0 and model["torch_ms"] is None
        assert set(model) >= {"name", "dtype", "passed", "max_abs_error", "tvm_ms", "torch_ms",
                              "torch_graph_ms", "gbps"}  # fmt: skip
    conv = next(m for m in report["models"] if m["name"] == "s2_gconv_s2")
    assert conv["gbps"] > 0
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(lines) == len(report["models"])
    assert (tmp_path / "out" / "gpu_results.md").read_text().count("| yes |") == len(lines)


def test_rehearsal_fails_when_the_library_computes_something_else(rehearsal_kit, tmp_path):
    """The check can fail: the branchy block's reference gets one conv's output channels
    reversed, so the library (built from the original weights) no longer matches it."""
    kit = tmp_path / "kit"
    shutil.copytree(rehearsal_kit, kit)
    path = kit / "models" / "resnext_block_branchy.float32.onnx"
    model = onnx.load(path)
    weight = next(t for t in model.graph.initializer if t.name == "block_conv3_w")
    reversed_channels = numpy_helper.to_array(weight)[::-1].copy()
    weight.CopyFrom(numpy_helper.from_array(reversed_channels, weight.name))
    onnx.save(model, path)
    done = _rehearse(kit, tmp_path / "out")
    assert done.returncode == 1, done.stdout[-2000:]
    assert "FAIL resnext_block_branchy    float32" in done.stdout
    assert "PASS resnext_block_branchy    float16" in done.stdout
