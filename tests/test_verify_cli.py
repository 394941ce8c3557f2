"""`gconv-compile compile` and `verify` from the command line: reports, exit codes, bad input.

Exit codes: 0 every output within tolerance, 1 some output is not, 2 bad input (one line on
stderr, nothing written).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import split_conv_concat

from gconv_compile.cli import main
from gconv_compile.targets import cuda_available


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Two models with the same inputs and outputs but other weights, each compiled once."""
    folder = tmp_path_factory.mktemp("verify_cli")
    onnx.save(split_conv_concat(seed=0), folder / "a.onnx")
    onnx.save(split_conv_concat(seed=1), folder / "b.onnx")
    for name in ("a", "b"):
        code = main(["compile", str(folder / f"{name}.onnx"), "-o", str(folder / f"{name}.so"),
                     "--report", str(folder / f"{name}.compile.json")])  # fmt: skip
        assert code == 0
    x = np.random.default_rng(5).standard_normal((3, 8, 6, 6)).astype(np.float32)
    np.savez(folder / "good.npz", X=x)
    np.savez(folder / "wrong_name.npz", image=x)
    np.savez(folder / "wrong_dtype.npz", X=x.astype(np.float64))
    np.savez(folder / "wrong_shape.npz", X=x[:, :4])
    (folder / "garbage.npz").write_bytes(b"not a zip file")
    # A library without its sidecar; one whose sidecar describes another library; a broken one.
    shutil.copy(folder / "a.so", folder / "no_sidecar.so")
    shutil.copy(folder / "b.so", folder / "swapped.so")
    shutil.copy(folder / "a.so.json", folder / "swapped.so.json")
    shutil.copy(folder / "a.so", folder / "broken_sidecar.so")
    (folder / "broken_sidecar.so.json").write_text("{not json")
    return folder


def test_compile_report_records_target_library_and_timings(work):
    report = json.loads((work / "a.compile.json").read_text())
    assert report["command"] == "compile" and report["target"] == "llvm"
    assert report["summary"]["rewrites"] == 1 and report["summary"]["check_passed"] is True
    assert report["library"]["inputs"][0]["name"] == "X"
    assert report["output"] == str(work / "a.so")
    assert set(report["timings"]) >= {"optimize_s", "import_s", "build_s", "export_s"}


def test_verify_passes_and_reports_each_output_like_polygraphy(work, capsys):
    code = main(["verify", str(work / "a.onnx"), "--lib", str(work / "a.so"),
                 "--report", str(work / "verify.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verify: PASS: 1/1 output(s)" in out
    check = json.loads((work / "verify.json").read_text())["check"]
    assert check["passed"] is True and check["seeds"] == [0, 1, 2]
    (stat,) = check["outputs"]
    assert stat["name"] == "Y" and stat["shape"] == [2, 8, 6, 6]
    assert {"max_abs_error", "mean_abs_error", "max_rel_error", "worst_index"} <= set(stat)
    assert stat["max_abs_error"] <= stat["atol"] + stat["rtol"] * 100
    assert 0 <= stat["margin"] <= 1 and check["margin"] == stat["margin"]
    assert f"margin {stat['margin']:.3g} PASS" in out


def test_verify_a_library_named_relative_to_the_working_folder(work, capsys, monkeypatch):
    """`cd DIR && verify M.onnx --lib M.so` once failed: dlopen looked for M.so on its path."""
    monkeypatch.chdir(work)
    code = main(["verify", "a.onnx", "--lib", "a.so", "--seeds", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verify: PASS" in out


def test_verify_with_user_inputs_and_with_a_build_made_now(work, capsys):
    assert main(["verify", str(work / "a.onnx"), "--lib", str(work / "a.so"),
                 "--inputs", str(work / "good.npz")]) == 0  # fmt: skip
    assert "1 set from --inputs" in capsys.readouterr().out
    assert main(["verify", str(work / "a.onnx"), "--target", "llvm", "--seeds", "1"]) == 0
    assert "compiled now" in capsys.readouterr().out


def test_library_of_another_model_is_refused(work, capsys):
    code = main(["verify", str(work / "a.onnx"), "--lib", str(work / "b.so")])
    err = capsys.readouterr().err
    assert code == 2
    assert "compiled from a different model" in err and len(err.strip().splitlines()) == 1


def test_library_of_another_model_fails_the_numbers_when_compared_anyway(work, capsys):
    """With the fingerprint check off, the comparison itself catches the other weights."""
    code = main(["verify", str(work / "a.onnx"), "--lib", str(work / "b.so"),
                 "--ignore-fingerprint", "--report", str(work / "fail.json")])  # fmt: skip
    assert code == 1
    assert "verify: FAIL: 0/1" in capsys.readouterr().out
    assert json.loads((work / "fail.json").read_text())["check"]["passed"] is False


def test_user_tolerances_apply_and_still_catch_other_weights(work, capsys):
    """--atol/--rtol replace the defaults; other weights miss even atol 1, rtol 0.5."""
    code = main(["verify", str(work / "a.onnx"), "--lib", str(work / "b.so"),
                 "--ignore-fingerprint", "--atol", "1", "--rtol", "0.5"])  # fmt: skip
    assert code == 1
    out = capsys.readouterr().out
    assert "(atol 1, rtol 0.5), margin " in out and out.count(" FAIL") >= 1
    margin = float(out.split("(atol 1, rtol 0.5), margin ")[1].split()[0])
    assert margin > 1


BAD_VERIFY = {
    "missing-library": (["--lib", "{w}/nope.so"], "no such library"),
    "library-without-sidecar": (["--lib", "{w}/no_sidecar.so"], "no no_sidecar.so.json"),
    "sidecar-of-another-library": (["--lib", "{w}/swapped.so"], "describes another library"),
    "broken-sidecar": (["--lib", "{w}/broken_sidecar.so"], "not a gconv-compile library"),
    "garbage-npz": (["--lib", "{w}/a.so", "--inputs", "{w}/garbage.npz"], "not a readable .npz"),
    "missing-npz": (["--lib", "{w}/a.so", "--inputs", "{w}/none.npz"], "no such file"),
    "npz-wrong-name": (["--lib", "{w}/a.so", "--inputs", "{w}/wrong_name.npz"], "missing ['X']"),
    "npz-wrong-dtype": (["--lib", "{w}/a.so", "--inputs", "{w}/wrong_dtype.npz"], "float64"),
    "npz-wrong-shape": (["--lib", "{w}/a.so", "--inputs", "{w}/wrong_shape.npz"], "shape"),
    "shape-conflicts-with-static-dims": (
        ["--lib", "{w}/a.so", "--shape", "X=1x4x6x6"],
        "conflicts",
    ),
    "shape-unknown-input": (["--lib", "{w}/a.so", "--shape", "image=1x8x6x6"], "unknown input"),
    "lib-and-target": (["--lib", "{w}/a.so", "--target", "llvm"], "not allowed with"),
    "zero-seeds": (["--lib", "{w}/a.so", "--seeds", "0"], "--seeds"),
    "negative-rtol": (["--lib", "{w}/a.so", "--rtol", "-1"], "--rtol"),
    "unknown-target": (["--target", "tpu"], "invalid choice"),
    **(
        {}
        if cuda_available()
        else {"cuda-target-without-gpu": (["--target", "cuda"], "none is visible")}
    ),
}


@pytest.mark.parametrize("case", list(BAD_VERIFY))
def test_verify_bad_input_exits_2_with_one_line(work, capsys, case):
    args, message = BAD_VERIFY[case]
    code = main(["verify", str(work / "a.onnx"), *[a.format(w=work) for a in args]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_verify_missing_model_exits_2(work, capsys):
    assert main(["verify", str(work / "none.onnx"), "--lib", str(work / "a.so")]) == 2
    assert "no such file" in capsys.readouterr().err


BAD_COMPILE = {
    "not-a-so-name": (["-o", "{w}/out.bin"], "must end in .so"),
    "arch-on-llvm": (["-o", "{w}/out.so", "--arch", "sm_90"], "--arch applies to --target cuda"),
    "bad-arch": (["-o", "{w}/out.so", "--target", "cuda", "--arch", "90"], "expected sm_XY"),
    "unknown-target": (["-o", "{w}/out.so", "--target", "tpu"], "invalid choice"),
    "output-is-a-folder": (["-o", "{w}"], "is a folder"),
    "missing-folder": (["-o", "{w}/no/out.so"], "does not exist"),
    "emit-source-is-a-file": (["-o", "{w}/out.so", "--emit-source", "{w}/a.onnx"], "not a folder"),
    "shape-unknown-input": (["-o", "{w}/out.so", "--shape", "image=1x8x6x6"], "unknown input"),
}


@pytest.mark.parametrize("case", list(BAD_COMPILE))
def test_compile_bad_input_exits_2_and_writes_nothing(work, capsys, case):
    args, message = BAD_COMPILE[case]
    before = sorted(p.name for p in work.iterdir())
    code = main(["compile", str(work / "a.onnx"), *[a.format(w=work) for a in args]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in work.iterdir()) == before


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_verify_cuda_library_without_gpu_exits_2(work, capsys):
    assert main(["compile", str(work / "a.onnx"), "-o", str(work / "a_cuda.so"),
                 "--target", "cuda", "--no-check"]) == 0  # fmt: skip
    assert "CUDA_PATH" in capsys.readouterr().out
    code = main(["verify", str(work / "a.onnx"), "--lib", str(work / "a_cuda.so")])
    assert code == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_default_atol_scales_with_the_output_rms_and_explicit_atol_does_not():
    from gconv_compile.compare import TVM_TOLERANCES, compare_results

    def _compare(references, candidates, device, atol, rtol):
        return compare_results(
            references, candidates, atol=atol, rtol=rtol, tolerances=TVM_TOLERANCES[device],
            scale_atol=True,
        )  # fmt: skip

    ref = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32) * 1000
    rounding = ref + np.float32(1e-3)  # ~1e-6 of the scale: float32 rounding over a deep net
    wrong = ref + np.float32(1.0)
    (ok,) = _compare([{"y": ref}], [{"y": rounding}], "cpu", None, None)
    (bad,) = _compare([{"y": ref}], [{"y": wrong}], "cpu", None, None)
    (strict,) = _compare([{"y": ref}], [{"y": rounding}], "cpu", 1e-5, 0.0)
    assert ok.passed and "output RMS" in ok.note and ok.atol > 1e-3
    assert not bad.passed
    assert not strict.passed and strict.atol == 1e-5
