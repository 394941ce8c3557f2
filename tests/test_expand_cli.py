"""``gconv-compile expand`` and ``gconv_compile.expand``: options, reports, exit codes, what is
written (atomically, only after the check) and what is preserved."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import onnx_ir as ir
import pytest
from grouped_models import assert_same_outputs, conv_chain, grouped_conv, grouped_convs

import gconv_compile
from gconv_compile.cli import main
from gconv_compile.errors import UserError

MIXED = [
    ("g2", "Conv", 2, 8),
    ("dw", "Conv", 8, 16),
    ("g4", "Conv", 4, 8),
    ("tg2", "ConvTranspose", 2, 8),
    ("tdw", "ConvTranspose", 8, 8),
]


@pytest.fixture
def mixed(tmp_path):
    proto = conv_chain(MIXED)
    proto.doc_string = "a model with five grouped convolutions"
    onnx.helper.set_model_props(proto, {"author": "tests", "purpose": "expand"})
    path = tmp_path / "mixed.onnx"
    onnx.save(proto, path)
    return proto, path


def left_after(path) -> list[str]:
    return sorted(name for name, *_ in grouped_convs(onnx.load(path)))


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("options", "left"),
    [
        pytest.param([], [], id="defaults"),
        pytest.param(["--mode", "dense"], [], id="dense"),
        pytest.param(["--keep-depthwise"], ["dw", "tdw"], id="keep-depthwise"),
        pytest.param(["--min-group", "4"], ["g2", "tg2"], id="min-group"),
        pytest.param(["--max-group", "2"], ["dw", "g4", "tdw"], id="max-group"),
        pytest.param(["--skip", "g2", "--skip", "tdw"], ["g2", "tdw"], id="skip-twice"),
        pytest.param(["--target", "tflite"], ["dw", "g2", "g4"], id="target-tflite"),
        pytest.param(["--target", "nnapi"], ["dw"], id="target-nnapi"),
        pytest.param(["--target", "nnapi", "--skip", "g4"], ["dw", "g4"], id="target-and-skip"),
        pytest.param(["--target", "cuda"], ["dw", "g2", "g4", "tdw", "tg2"], id="target-cuda"),
    ],
)
def test_expand_options(mixed, tmp_path, capsys, options, left):
    proto, path = mixed
    out = tmp_path / "out.onnx"
    assert main(["expand", str(path), "-o", str(out), "--seeds", "1", *options]) == 0
    printed = capsys.readouterr().out
    assert left_after(out) == left
    expanded = 5 - len(left)
    assert f"summary: {expanded} " in printed
    if expanded:
        assert "1 output(s) match" in printed
        assert_same_outputs(proto, onnx.load(out), seeds=(3,))
    if "cuda" in options:
        assert "runs every grouped convolution; nothing to expand" in printed


def test_report_lists_rewrites_skips_and_warnings(mixed, tmp_path):
    _, path = mixed
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    argv = ["expand", str(path), "-o", str(out), "--mode", "dense", "--keep-depthwise"]
    assert main([*argv, "--report", str(report), "--seeds", "1"]) == 0
    data = json.loads(report.read_text())
    assert data["command"] == "expand" and data["output"] == str(out)
    assert data["summary"]["rewrites"] == 3 and data["summary"]["skipped"] == 2
    assert data["summary"]["check_passed"] is True
    by_anchor = {r["anchor"]: r["details"] for r in data["rewrites"]}
    assert by_anchor["g4"]["mode"] == "dense" and by_anchor["g4"]["flop_multiplier"] == 4
    assert {s["anchor"] for s in data["skipped"]} == {"dw", "tdw"}
    assert len(data["warnings"]) == 1 and "g4: dense expansion does 4x" in data["warnings"][0]


def test_output_keeps_model_metadata(mixed, tmp_path):
    _, path = mixed
    out = tmp_path / "out.onnx"
    assert main(["expand", str(path), "-o", str(out), "--no-check"]) == 0
    result = onnx.load(out)
    assert result.doc_string == "a model with five grouped convolutions"
    assert {p.key: p.value for p in result.metadata_props} == {
        "author": "tests",
        "purpose": "expand",
    }
    assert [o.name for o in result.graph.output] == ["Y"]


# ------------------------------------------------------------------------------ exit codes


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--mode", "sparse"], "invalid choice: 'sparse'", id="bad-mode"),
        pytest.param(["--min-group", "1"], "--min-group must be at least 2", id="min-group-1"),
        pytest.param(
            ["--min-group", "8", "--max-group", "4"], "above --max-group", id="empty-range"
        ),
        pytest.param(["--max-group", "two"], "invalid int value", id="max-group-not-int"),
        pytest.param(["--target", "tpu"], "unknown target profile 'tpu'", id="unknown-target"),
        pytest.param(["--seeds", "0"], "--seeds must be at least 1", id="no-seeds"),
        pytest.param(["--shape", "nope"], "--shape 'nope'", id="bad-shape"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(mixed, tmp_path, capsys, argv, message):
    _, path = mixed
    before = path.read_bytes()
    out = tmp_path / "out.onnx"
    assert main(["expand", str(path), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists() and path.read_bytes() == before


def test_bad_input_paths_exit_2(mixed, tmp_path, capsys):
    _, path = mixed
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    cases = [
        (["expand", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx")], "no such file"),
        (["expand", str(garbage), "-o", str(tmp_path / "o.onnx")], "not an ONNX model"),
        (["expand", str(path), "-o", str(path)], "would overwrite the input"),
        (["expand", str(path), "-o", str(tmp_path / "no" / "o.onnx")], "does not exist"),
        (["expand", str(path), "-o", str(tmp_path / "o.onnx"), "--report", str(path)],
         "report would overwrite"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_command_line_entry_point(mixed, tmp_path):
    """The installed module runs as a process: exit code 0 and the output written."""
    _, path = mixed
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "gconv_compile.cli", "expand", str(path), "-o", str(out),
         "--target", "generic-npu", "--seeds", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "summary: 4 convs expanded, 1 skipped" in done.stdout  # depthwise ConvTranspose expanded
    assert left_after(out) == ["dw"]


# ------------------------------------------------------------------------------ Python API


def test_api_on_a_proto_returns_a_proto_and_leaves_the_input_alone():
    proto = grouped_conv(group=4, channels_out=8)
    before = proto.SerializeToString()
    result, report = gconv_compile.expand(proto, mode="dense", seeds=(0,))
    assert isinstance(result, onnx.ModelProto)
    assert proto.SerializeToString() == before
    assert report.command == "expand" and report.check.passed
    assert grouped_convs(result) == []
    assert report.warnings and "4x the multiply-adds" in report.warnings[0]


def test_api_on_an_ir_model_rewrites_in_place_and_on_a_path(mixed):
    proto, path = mixed
    model = ir.serde.deserialize_model(proto)
    result, report = gconv_compile.expand(model, keep_depthwise=True, skip=["g4"], seeds=(0,))
    assert result is model and len(report.rewrites) == 2
    from_path, path_report = gconv_compile.expand(path, target="tflite", seeds=(0,))
    assert path_report.input == str(path) and path_report.target == "tflite"
    assert sorted(n for n, *_ in grouped_convs(from_path)) == ["dw", "g2", "g4"]


def test_api_bad_options_are_user_errors():
    proto = grouped_conv()
    with pytest.raises(UserError, match="expansion mode must be one of split, dense"):
        gconv_compile.expand(proto, mode="sparse")
    with pytest.raises(UserError, match="unknown target profile"):
        gconv_compile.expand(proto, target="tpu")
    with pytest.raises(UserError, match="unknown target profile"):
        gconv_compile.optimize(proto, target="tpu")
