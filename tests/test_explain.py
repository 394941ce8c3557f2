"""``gconv-compile explain``: settings, refusals with advice, model tables, JSON and SVG.

Every case goes through the command line (``cli.main`` with captured output). The channel
ranges the explanation prints are checked against onnxruntime: a grouped Conv computes, for each
group, exactly the dense Conv of the printed input range with the printed weight rows.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import init, ints, make_model, split_conv_concat, tensor_info
from gconv_compile.passes import FoldSplitConvConcat
from onnx import helper

from gconv_compile import cli
from gconv_compile.explain import parse_conv_spec

SVG_NS = "{http://www.w3.org/2000/svg}"


def explain(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["explain", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ----------------------------------------------------------------------------- one setting

SETTINGS = {
    "grouped-16-2-k1": (
        ["--conv", "in=16,out=16,groups=2,kernel=1"],
        [
            "Conv2d in=16, out=16, groups=2, kernel 1x1",
            "grouped: 2 independent convolutions of 8 in -> 8 out",
            "ONNX Conv W, PyTorch .weight: [16, 8, 1, 1]  = [out, in/groups, kH, kW]",
            "Keras Conv2D kernel (channels-last): [1, 1, 8, 16]",
            "one tensor, not 2: 2 kernels [8, 8, 1, 1] stacked on axis 0 (output channels)",
            "group 0: in [0:8)  -> out [0:8)   W[0:8]",
            "group 1: in [8:16) -> out [8:16)  W[8:16]",
            "parameters 144 = weights 128 + bias 16",
            "dense (groups=1): 272 = weights 256 + bias 16; 2x fewer weights",
            "multiply-adds per output pixel: 128 (dense: 256; 2x fewer)",
            "x0, x1 = Split(X, axis=1, split=[8, 8])",
            "y1 = Conv(x1, W[8:16], B[8:16])",
            "Y = Concat(y0, y1, axis=1)",
            "nn.Conv2d(16, 16, kernel_size=1, groups=2)",
            "Conv(X, W, group=2, kernel_shape=[1, 1])",
            "Conv2D(filters=16, kernel_size=1, groups=2)",
            "feature_group_count=2",
        ],
    ),
    "dense-3x3": (
        ["--conv", "in=8,out=4,kernel=3x3"],
        ["dense: every output channel reads every input channel", "[4, 8, 3, 3]",
         "a dense convolution has no split form", "groups=1"],
    ),
    "depthwise-32": (
        ["--conv", "in=32,out=32,groups=32,kernel=3x3"],
        ["depthwise: each input channel is filtered on its own", "[32, 1, 3, 3]",
         "DepthwiseConv2D(kernel_size=3, depth_multiplier=1)", "Keras DepthwiseConv2D kernel "
         "(channels-last): [3, 3, 32, 1]", "group 31: in [31:32) -> out [31:32)"],
    ),
    "depthwise-multiplier-4-stride-2": (
        ["--conv", "in=16,out=64,groups=16,kernel=3,stride=2"],
        ["depthwise, multiplier 4", "[64, 1, 3, 3]", "depth_multiplier=4, strides=2",
         "group 15: in [15:16) -> out [60:64)", "strides=[2, 2]",
         "nn.Conv2d(16, 64, kernel_size=3, stride=2, groups=16)"],
    ),
    "conv1d": (
        ["--conv", "in=12,out=6,groups=3,kernel=5,dims=1"],
        ["Conv1d in=12, out=6, groups=3, kernel 5", "[6, 4, 5]  = [out, in/groups, kL]",
         "nn.Conv1d(12, 6, kernel_size=5, groups=3)"],
    ),
    "conv3d": (
        ["--conv", "in=16,out=32,groups=4,kernel=3x3x3"],
        ["Conv3d", "[32, 4, 3, 3, 3]", "Conv3D(filters=32, kernel_size=3, groups=4)"],
    ),
    "transpose-grouped": (
        ["--conv", "in=16,out=32,groups=2,kernel=4,stride=2", "--transpose"],
        ["ConvTranspose2d in=16, out=32, groups=2, kernel 4x4, stride 2x2",
         "ONNX ConvTranspose W, PyTorch .weight: [16, 16, 4, 4]  = [in, out/groups, kH, kW]",
         "stacked on axis 0 (input channels)", "group 1: in [8:16) -> out [16:32)  W[8:16]",
         "multiply-adds per input pixel: 4,096 (dense: 8,192; 2x fewer)",
         "y1 = ConvTranspose(x1, W[8:16], B[16:32])",
         "nn.ConvTranspose2d(16, 32, kernel_size=4, stride=2, groups=2)",
         "Conv2DTranspose has no groups setting", "lhs_dilation=2, feature_group_count=2"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("args, expected", SETTINGS.values(), ids=SETTINGS.keys())
def test_setting_is_explained_on_one_screen(capsys, args, expected):
    code, out, err = explain(capsys, *args)
    assert (code, err) == (0, "")
    for text in expected:
        assert text in out
    lines = out.splitlines()
    assert len(lines) <= 40 and max(map(len, lines)) <= 100


def test_512_groups_collapse_to_one_screen(capsys):
    code, out, _ = explain(capsys, "--conv", "in=512,out=512,groups=512,kernel=3")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) <= 40 and max(map(len, lines)) <= 100
    assert "... 508 more groups, same pattern ..." in out
    assert "group 511: in [511:512) -> out [511:512)  W[511:512]" in out
    assert "group 3:" not in out
    assert "x0, x1, x2, ..., x511 = Split(X, axis=1, split=[1] * 512)" in out


def test_json_lists_every_group(capsys):
    code, out, _ = explain(capsys, "--conv", "in=12,out=24,groups=12,kernel=3", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["kind"] == "depthwise, multiplier 2"
    assert data["depthwise_multiplier"] == 2
    assert data["weight_shape"]["onnx"] == [24, 1, 3, 3]
    assert data["weight_shape"]["keras"] == {"layer": "DepthwiseConv2D", "kernel": [3, 3, 12, 2]}
    assert len(data["groups"]) == 12
    assert data["groups"][5] == {
        "index": 5, "in_start": 5, "in_stop": 6, "out_start": 10, "out_stop": 12,
        "weight_start": 10, "weight_stop": 12,
    }  # fmt: skip
    assert data["params"] == {"weights": 216, "bias": 24, "dense_weights": 2592}
    assert data["macs"]["grouped"] == 216 and data["macs"]["dense"] == 2592
    assert set(data["names"]) == {"PyTorch", "ONNX", "Keras", "XLA"}


# Settings whose printed group ranges onnxruntime must confirm.
WIRING_CASES = {
    "conv-16-2": ("in=16,out=16,groups=2,kernel=1", False),
    "conv-6-12-3-k3": ("in=6,out=12,groups=3,kernel=3", False),
    "conv-depthwise-x2": ("in=4,out=8,groups=4,kernel=3", False),
    "transpose-6-4-2": ("in=6,out=4,groups=2,kernel=3,stride=2", True),
    "transpose-depthwise": ("in=4,out=4,groups=4,kernel=2,stride=2", True),
}


def _run_conv(op: str, x: np.ndarray, w: np.ndarray, group: int, strides: list[int]) -> np.ndarray:
    node = helper.make_node(op, ["X", "W"], ["Y"], group=group, strides=strides)
    rank = x.ndim
    model = make_model(
        [node], [tensor_info("X", x.shape)], [tensor_info("Y", [None] * rank)], [init("W", w)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


@pytest.mark.parametrize("text, transpose", WIRING_CASES.values(), ids=WIRING_CASES.keys())
def test_printed_group_ranges_are_what_onnxruntime_computes(capsys, text, transpose):
    args = ["--conv", text, "--json"] + (["--transpose"] if transpose else [])
    code, out, _ = explain(capsys, *args)
    data = json.loads(out)
    assert code == 0
    spec = data["spec"]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, spec["in_channels"], 5, 5)).astype(np.float32)
    w = rng.standard_normal(data["weight_shape"]["onnx"]).astype(np.float32)
    op = spec["op_type"]
    grouped = _run_conv(op, x, w, spec["groups"], spec["stride"])
    assert grouped.shape[1] == spec["out_channels"]
    for group in data["groups"]:
        part = _run_conv(
            op,
            x[:, group["in_start"] : group["in_stop"]],
            w[group["weight_start"] : group["weight_stop"]],
            1,
            spec["stride"],
        )
        np.testing.assert_allclose(
            grouped[:, group["out_start"] : group["out_stop"]], part, rtol=1e-5, atol=1e-5
        )


# ----------------------------------------------------------------------------- refusals

INVALID = {
    "in3-out8-groups3": (
        "in=3,out=8,groups=3",
        ["out_channels=8 is not divisible by groups=3", "in_channels=3 is (1 per group)",
         "Nearest valid out_channels for groups=3: 6 or 9", "Valid groups for in=3, out=8: 1.",
         "[3, 3, 2] outputs", "out=9 and drop the 1 extra output channel"],
    ),
    "in-not-divisible": (
        "in=3,out=8,groups=2",
        ["in_channels=3 is not divisible by groups=2", "Nearest valid in_channels for groups=2: "
         "2 or 4", "zero-pad the input to in=4"],
    ),
    "both-not-divisible": (
        "in=16,out=16,groups=3",
        ["in_channels=16 is not divisible", "out_channels=16 is not divisible",
         "Valid groups for in=16, out=16: 1, 2, 4, 8, 16."],
    ),
    "groups-zero": ("in=16,out=16,groups=0", ["groups=0: groups must be at least 1"]),
    "groups-negative": ("in=16,out=16,groups=-4", ["groups=-4: groups must be at least 1"]),
    "in-zero": ("in=0,out=16", ["in=0: a convolution needs at least one input channel"]),
    "out-negative": ("in=8,out=-8", ["out=-8: a convolution needs at least one output channel"]),
    "groups-more-than-in": (
        "in=4,out=8,groups=8",
        ["groups=8 is more than in=4", "groups can be at most 4", "Valid groups for in=4, out=8: "
         "1, 2, 4."],
    ),
    "groups-more-than-out": ("in=16,out=8,groups=32", ["groups=32 is more than out=8"]),
    "kernel-zero": ("in=4,out=4,kernel=0", ["kernel=0: every kernel entry must be at least 1"]),
    "stride-negative": ("in=4,out=4,stride=-1", ["stride=-1: every stride entry"]),
    "kernel-malformed": ("in=4,out=4,kernel=3x", ["kernel=3x: expected a size like 3 or 3x3"]),
    "kernel-vs-dims": ("in=4,out=4,kernel=3x3,dims=3", ["kernel=3x3 has 2 spatial dims but dims=3"]),
    "kernel-vs-stride": ("in=4,out=4,kernel=3x3,stride=2x2x2", ["different numbers of spatial"]),
    "dims-4": ("in=4,out=4,dims=4", ["dims=4: give 1, 2 or 3"]),
    "unknown-key": ("in=4,ot=4", ["unknown key 'ot' (did you mean 'out'?)"]),
    "missing-out": ("in=4", ["--conv needs out="]),
    "not-a-number": ("in=1.5,out=2", ["in=1.5 is not a whole number"]),
    "no-equals": ("in16,out=2", ["'in16' is not KEY=VALUE"]),
    "empty-entry": ("in=16,,out=2", ["empty entry between commas"]),
    "empty-value": ("in=,out=2", ["'in=' has no value"]),
    "duplicate": ("in=4,in=4,out=4", ["'in' is given twice"]),
    "empty": ("", ["--conv is empty"]),
}  # fmt: skip


@pytest.mark.parametrize("text, expected", INVALID.values(), ids=INVALID.keys())
def test_invalid_setting_exits_2_with_advice(capsys, tmp_path, text, expected):
    svg = tmp_path / "never.svg"
    code, out, err = explain(capsys, "--conv", text, "--svg", svg)
    assert code == 2 and out == ""
    assert err.startswith("gconv-compile: error: ")
    flat = " ".join(err.split())
    for phrase in expected:
        assert phrase in flat
    lines = err.splitlines()
    # One line, or one paragraph wrapped for a 100-column terminal.
    assert len(lines) == 1 or (len(lines) <= 7 and max(map(len, lines)) <= 100)
    assert list(tmp_path.iterdir()) == []


def test_invalid_setting_through_a_real_process(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "gconv_compile", "explain", "--conv", "in=3,out=8,groups=3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert "6 or 9" in result.stderr and "Traceback" not in result.stderr


USAGE = {
    "neither": ([], "explain needs MODEL.onnx or --conv SPEC"),
    "both": (["m.onnx", "--conv", "in=4,out=4"], "not both"),
    "transpose-without-conv": (["m.onnx", "--transpose"], "--transpose goes with --conv"),
    "node-without-model": (["--conv", "in=4,out=4", "--node", "c"], "--node NAME picks a Conv"),
    "svg-is-folder": (["--conv", "in=4,out=4", "--svg", "."], "is a folder"),
    "svg-folder-missing": (["--conv", "in=4,out=4", "--svg", "nope/x.svg"], "does not exist"),
    "missing-model": (["missing.onnx"], "missing.onnx: no such file"),
}


@pytest.mark.parametrize("args, message", USAGE.values(), ids=USAGE.keys())
def test_usage_errors_exit_2(capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = explain(capsys, *args)
    assert code == 2 and out == ""
    assert message in err
    assert len(err.splitlines()) == 1


def test_not_an_onnx_file_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage that is not protobuf\xff\xff")
    code, _, err = explain(capsys, bad)
    assert code == 2 and "not an ONNX model" in err


# ----------------------------------------------------------------------------- models


def mobile_block(batch="N", spatial=(8, 8), seed=0) -> onnx.ModelProto:
    """Depthwise 3x3 -> BN -> Relu -> 1x1 8->16 -> Split even -> 2 Conv -> Concat (folds)
    -> Split [4, 12] -> 2 Conv -> Concat (uneven: no fold) -> ConvTranspose 16->8 group 2."""
    r = np.random.default_rng(seed)

    def w(name, *shape):
        return init(name, r.standard_normal(shape).astype(np.float32))

    pad = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["X", "dw.w", "dw.b"], ["dw"], name="dw", group=8, **pad),
        helper.make_node("BatchNormalization", ["dw", "s", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["act"], name="act"),
        helper.make_node("Conv", ["act", "pw.w", "pw.b"], ["pw"], name="pw"),
        helper.make_node("Split", ["pw", "even"], ["a0", "a1"], axis=1, name="split_even"),
        helper.make_node("Conv", ["a0", "c0.w"], ["y0"], name="c0", **pad),
        helper.make_node("Conv", ["a1", "c1.w"], ["y1"], name="c1", **pad),
        helper.make_node("Concat", ["y0", "y1"], ["cat0"], axis=1, name="concat_even"),
        helper.make_node("Split", ["cat0", "uneven"], ["b0", "b1"], axis=1, name="split_uneven"),
        helper.make_node("Conv", ["b0", "d0.w"], ["z0"], name="d0", **pad),
        helper.make_node("Conv", ["b1", "d1.w"], ["z1"], name="d1", **pad),
        helper.make_node("Concat", ["z0", "z1"], ["cat1"], axis=1, name="concat_uneven"),
        helper.make_node("ConvTranspose", ["cat1", "up.w"], ["Y"], name="up", group=2,
                         strides=[2, 2]),
    ]  # fmt: skip
    inits = [
        w("dw.w", 8, 1, 3, 3), w("dw.b", 8), w("s", 8), w("b", 8), w("m", 8),
        init("v", r.uniform(0.5, 2, 8).astype(np.float32)),
        w("pw.w", 16, 8, 1, 1), w("pw.b", 16), ints("even", [8, 8]),
        w("c0.w", 8, 8, 3, 3), w("c1.w", 8, 8, 3, 3), ints("uneven", [4, 12]),
        w("d0.w", 4, 4, 3, 3), w("d1.w", 12, 12, 3, 3), w("up.w", 16, 4, 2, 2),
    ]  # fmt: skip
    return make_model(
        nodes,
        [tensor_info("X", [batch, 8, *spatial])],
        [tensor_info("Y", [batch, 8, None, None])],
        inits,
    )


@pytest.fixture
def mobile_path(tmp_path) -> Path:
    path = tmp_path / "mobile.onnx"
    onnx.save(mobile_block(), path)
    return path


def test_model_table_blocks_and_separable_pairs(capsys, mobile_path):
    before = hashlib.sha256(mobile_path.read_bytes()).hexdigest()
    code, out, err = explain(capsys, mobile_path)
    assert (code, err) == (0, "")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isalpha()}
    # name op in out group kind weight... params MACs (N x <value>)
    assert rows["dw"][1:6] == ["Conv", "8", "8", "8", "depthwise"]
    assert rows["pw"][1:6] == ["Conv", "8", "16", "1", "dense"]
    assert rows["up"][1:6] == ["ConvTranspose", "16", "8", "2", "grouped"]
    assert "[16, 4, 2, 2]" in out
    # dw: 8*1*3*3 weights per output pixel, 8x8 output pixels per batch item N.
    assert " ".join(rows["dw"][-3:]) == "N x 4.61k"
    # up (ConvTranspose): 16*4*2*2 weights per input pixel, 8x8 input pixels.
    assert " ".join(rows["up"][-3:]) == "N x 16.4k"
    assert "concat_even: would fold: 2 x Conv -> one Conv(group=2)" in out
    assert "concat_uneven: would NOT fold: uneven split sizes [4, 12]" in out
    assert "dw (depthwise 3x3, 8 -> 8) then pw (1x1, 8 -> 16)" in out
    # separable: (72 + 8) + (128 + 16) = 224 parameters; dense 3x3 8->16: 1152 + 16.
    assert "parameters 224 vs 1,168 (5.2x fewer)" in out
    assert hashlib.sha256(mobile_path.read_bytes()).hexdigest() == before


def test_model_json(capsys, mobile_path):
    code, out, _ = explain(capsys, mobile_path, "--json")
    data = json.loads(out)
    assert code == 0
    assert data["model"] == str(mobile_path)
    convs = {c["name"]: c for c in data["convs"]}
    assert list(convs) == ["dw", "pw", "c0", "c1", "d0", "d1", "up"]
    assert convs["dw"]["macs"] is None  # the batch dim is symbolic
    assert convs["dw"]["macs_symbols"] == ["N"]
    assert convs["dw"]["macs_coefficient"] == 8 * 9 * 64
    assert convs["up"]["macs_coefficient"] == 16 * 4 * 4 * 64
    assert convs["pw"]["params"] == 16 * 8 + 16 and convs["c0"]["params"] == 8 * 8 * 9
    blocks = {b["anchor"]: b for b in data["split_conv_concat"]}
    assert blocks["concat_even"]["would_fold"] is True
    assert blocks["concat_even"]["details"]["weight_shape"] == [16, 8, 3, 3]
    assert blocks["concat_uneven"]["would_fold"] is False
    assert "uneven split sizes" in blocks["concat_uneven"]["reason"]
    (pair,) = data["depthwise_separable"]
    assert (pair["depthwise"], pair["pointwise"]) == ("dw", "pw")
    assert (pair["params"], pair["dense_params"]) == (224, 1168)
    assert (pair["macs_per_pixel"], pair["dense_macs_per_pixel"]) == (72 + 128, 1152)
    assert pair["macs_symbolic"] == "N x 12.8k"


def test_static_shapes_give_exact_macs(capsys, tmp_path):
    path = tmp_path / "static.onnx"
    onnx.save(mobile_block(batch=2, spatial=(6, 6)), path)
    code, out, _ = explain(capsys, path, "--json")
    convs = {c["name"]: c for c in json.loads(out)["convs"]}
    assert code == 0
    assert convs["dw"]["macs"] == 2 * 36 * 8 * 9
    assert convs["c0"]["macs"] == 2 * 36 * 8 * 8 * 9


def test_symbolic_spatial_dims_are_shown_by_name(capsys, tmp_path):
    path = tmp_path / "symbolic.onnx"
    onnx.save(mobile_block(batch="N", spatial=("H", "W")), path)
    code, out, _ = explain(capsys, path, "--json")
    convs = {c["name"]: c for c in json.loads(out)["convs"]}
    assert code == 0
    # The ConvTranspose slides over its input, whose dims shape inference cannot name: '?'.
    assert convs["dw"]["macs_symbols"][:1] == ["N"] and convs["dw"]["macs"] is None
    assert convs["dw"]["macs_coefficient"] == 8 * 9
    assert all(c["macs_text"].startswith("N x ") for c in convs.values())


def test_model_with_external_data_and_a_subgraph_free_fold_preview(capsys, tmp_path):
    model = split_conv_concat(channels=8, groups=2, out_per_branch=64)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.data", size_threshold=64)
    code, out, err = explain(capsys, path)
    assert (code, err) == (0, "")
    assert "concat: would fold: 2 x Conv -> one Conv(group=2), weight [128, 4, 3, 3]" in out


def test_node_explains_one_conv_and_draws_it(capsys, mobile_path, tmp_path):
    svg = tmp_path / "up.svg"
    code, out, err = explain(capsys, mobile_path, "--node", "up", "--svg", svg)
    assert (code, err) == (0, "")
    assert "node 'up' (ConvTranspose)" in out
    assert "ConvTranspose2d in=16, out=8, groups=2, kernel 2x2, stride 2x2" in out
    assert f"wrote {svg} (wiring picture, 2 groups)" in out
    root = ET.parse(svg).getroot()
    assert root.get("data-op-type") == "ConvTranspose"
    assert [g.get("data-out-start") for g in _groups(root)] == ["0", "4"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--node", "nope"], "--node nope: no Conv or ConvTranspose of that name"),
        (["--svg", "x.svg"], "--svg draws one convolution: add --node NAME (grouped ones: dw, up)"),
    ],
    ids=["unknown-node", "svg-without-node"],
)
def test_model_option_errors(capsys, mobile_path, args, message):
    code, out, err = explain(capsys, mobile_path, *args)
    assert code == 2 and out == "" and message in err


def test_svg_never_overwrites_the_model(capsys, mobile_path):
    before = mobile_path.read_bytes()
    code, _, err = explain(capsys, mobile_path, "--node", "dw", "--svg", mobile_path)
    assert code == 2 and "would overwrite the model" in err
    assert mobile_path.read_bytes() == before


# ----------------------------------------------------------------------------- pictures


def _groups(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "group"]


SVG_CASES = {
    "2-channels": ("in=2,out=2,groups=2", False, "wiring"),
    "16-groups-2": ("in=16,out=16,groups=2,kernel=1", False, "wiring"),
    "16-to-32-transpose": ("in=16,out=32,groups=4,kernel=2,stride=2", True, "wiring"),
    "64-depthwise": ("in=64,out=64,groups=64,kernel=3", False, "wiring"),
    "64-dense": ("in=64,out=64,kernel=3", False, "wiring"),
    "512-depthwise": ("in=512,out=512,groups=512,kernel=3", False, "mask"),
    "512-to-256-groups-32": ("in=512,out=256,groups=32", False, "mask"),
}


@pytest.mark.parametrize("text, transpose, mode", SVG_CASES.values(), ids=SVG_CASES.keys())
def test_svg_has_one_block_per_group_with_its_channel_ranges(
    capsys, tmp_path, text, transpose, mode
):
    svg = tmp_path / "picture.svg"
    svg.write_text("old picture")  # replaced whole, never appended to
    args = ["--conv", text, "--svg", svg] + (["--transpose"] if transpose else [])
    code, out, _ = explain(capsys, *args)
    assert code == 0 and f"wrote {svg} ({mode} picture" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picture.svg"]  # no temporary left
    root = ET.parse(svg).getroot()
    spec = parse_conv_spec(text, transpose=transpose)
    assert root.get("data-mode") == mode
    assert int(root.get("data-groups")) == spec.groups
    groups = _groups(root)
    assert len(groups) == spec.groups
    assert len({g.get("fill") for g in groups}) == spec.groups  # one colour per group
    for element, expected in zip(groups, spec.group_ranges()):
        got = tuple(int(element.get(f"data-{k}")) for k in ("group", "in-start", "in-stop",
                                                               "out-start", "out-stop"))  # fmt: skip
        assert got == (expected.index, expected.in_start, expected.in_stop, expected.out_start,
                       expected.out_stop)  # fmt: skip
        if mode == "wiring":
            channels = [r for r in element if r.get("class") == "channel"]
            ins = sorted(int(r.get("data-channel")) for r in channels if r.get("data-side") == "in")
            outs = sorted(
                int(r.get("data-channel")) for r in channels if r.get("data-side") == "out"
            )
            assert ins == list(range(expected.in_start, expected.in_stop))
            assert outs == list(range(expected.out_start, expected.out_stop))
        else:
            (block,) = [r for r in element if r.get("class") == "block"]
            assert float(block.get("width")) > 0 and float(block.get("height")) > 0


def test_groups_doc_is_what_the_script_prints_now(tmp_path):
    """docs/understanding_groups.md and its picture are regenerated output, not hand edits."""
    repo = Path(__file__).resolve().parents[1]
    script = repo / "scripts" / "make_groups_docs.py"
    spec = importlib.util.spec_from_file_location("make_groups_docs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "run").mkdir()
    text = module.render(tmp_path / "run", root=tmp_path)
    stale = "stale: run .venv/bin/python scripts/make_groups_docs.py"
    assert text == module.DOC.read_text(), stale
    picture = module.PICTURE.relative_to(repo)
    assert (tmp_path / picture).read_bytes() == module.PICTURE.read_bytes(), stale
    readme = module.README.read_text()
    assert module.readme_with_section(readme, text) == readme, stale


def _save(tmp_path, name, model) -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_weight_of_unknown_shape_is_shown_as_symbols(capsys, tmp_path):
    model = make_model(
        [helper.make_node("Conv", ["X", "W"], ["Y"], name="dyn")],
        [tensor_info("X", ["N", 8, 5, 5]), tensor_info("W", ["O", "I", 3, 3])],
        [tensor_info("Y", ["N", None, None, None])],
    )
    path = _save(tmp_path, "dyn.onnx", model)
    code, out, _ = explain(capsys, path)
    assert code == 0
    assert "dyn   Conv   ?    ?      1  ?     [O, I, 3, 3]       ?     ?" in out
    assert "(1 Conv of unknown weight shape not counted)" in out
    code, _, err = explain(capsys, path, "--node", "dyn")
    assert code == 2 and "its weight shape is not known statically" in err


def test_invalid_group_in_a_model_is_flagged(capsys, tmp_path):
    # The ONNX checker accepts group=3 with 8 output channels; onnxruntime would refuse to run it.
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["Y"], name="bad", group=3)], "g",
        [tensor_info("X", [1, 3, 5, 5])], [tensor_info("Y", [1, 8, 3, 3])],
        [init("W", np.random.default_rng(0).standard_normal((8, 1, 3, 3)).astype(np.float32))],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = _save(tmp_path, "bad.onnx", model)
    code, out, _ = explain(capsys, path)
    assert code == 0
    assert "bad   Conv   3    8      3  invalid" in out
    assert (
        f"invalid: bad has in=3, out=8, group=3; see `gconv-compile explain {path} --node bad`"
        in out
    )
    code, _, err = explain(capsys, path, "--node", "bad")
    assert code == 2 and "Nearest valid out_channels for groups=3: 6 or 9" in " ".join(err.split())


def test_convs_inside_subgraphs_are_listed_with_their_scope(capsys, tmp_path):
    weight = init("W2", np.random.default_rng(0).standard_normal((4, 2, 1, 1)).astype(np.float32))
    then = helper.make_graph(
        [helper.make_node("Conv", ["X", "W2"], ["t"], name="inner", group=2)], "then", [],
        [tensor_info("t", [1, 4, 5, 5])], [weight],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["e"])], "else", [], [tensor_info("e", [1, 4, 5, 5])]
    )
    model = make_model(
        [helper.make_node("If", ["c"], ["Y"], then_branch=then, else_branch=other, name="if")],
        [tensor_info("c", [], onnx.TensorProto.BOOL), tensor_info("X", [1, 4, 5, 5])],
        [tensor_info("Y", [1, 4, 5, 5])],
    )
    path = _save(tmp_path, "if.onnx", model)
    code, out, _ = explain(capsys, path)
    assert code == 0 and "g/then/inner  Conv   4    4      2  grouped  [4, 2, 1, 1]" in out
    code, out, _ = explain(capsys, path, "--node", "g/then/inner")
    assert code == 0 and "Conv2d in=4, out=4, groups=2, kernel 1x1" in out


def test_model_without_convs(capsys, tmp_path):
    model = make_model(
        [helper.make_node("Relu", ["X"], ["Y"])],
        [tensor_info("X", [1, 2])],
        [tensor_info("Y", [1, 2])],
    )
    code, out, _ = explain(capsys, _save(tmp_path, "relu.onnx", model))
    assert code == 0 and "relu.onnx: 0 Conv/ConvTranspose" in out
    assert "split-conv-concat blocks: none" in out


@pytest.mark.parametrize(
    "message, shown",
    [("boom", "RuntimeError: boom"), ("boom\n  in   block 3\n", "RuntimeError: boom in block 3")],
    ids=["one-line", "several-lines"],
)
def test_a_failing_fold_pass_leaves_the_table(capsys, monkeypatch, mobile_path, message, shown):
    def broken(self, model):
        raise RuntimeError(message)

    monkeypatch.setattr(FoldSplitConvConcat, "call", broken)
    code, out, _ = explain(capsys, mobile_path)
    assert code == 0
    assert any(line.startswith("dw ") and "depthwise" in line for line in out.splitlines())
    assert f"split-conv-concat blocks: unknown, the fold pass failed ({shown}); please" in out


def test_torchscript_chunk_model_has_concrete_costs(capsys):
    """Slice bounds computed by Shape arithmetic do not hide the branch convs' sizes."""
    path = Path(__file__).parent / "fixtures" / "torch" / "resnext_block_ts17.onnx"
    code, out, _ = explain(capsys, path)
    assert code == 0
    assert "unk__" not in out
    assert out.count("batch x 9.22k") == 8  # the eight 4->4 3x3 branch convs on 8x8


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_svg_file_gets_the_mode_the_umask_gives(capsys, tmp_path, mask):
    svg = tmp_path / "groups.svg"
    old = os.umask(mask)
    try:
        code, _, err = explain(capsys, "--conv", "in=4,out=4,groups=2", "--svg", svg)
    finally:
        os.umask(old)
    assert (code, err) == (0, "")
    assert stat.S_IMODE(svg.stat().st_mode) == 0o666 & ~mask


EXPLAIN_MODULES = sorted(
    (Path(__file__).resolve().parents[1] / "gconv_compile").glob("explain*.py")
)


@pytest.mark.parametrize("path", EXPLAIN_MODULES, ids=lambda p: p.stem)
def test_explain_modules_import_at_the_top_and_one_way(path):
    """No import hidden in a function; the worker modules never import the command module."""
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    hidden = [
        f"{f.name}:{n.lineno}"
        for f in functions
        for n in ast.walk(f)
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    assert hidden == []
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    if path.stem != "explain":
        assert "gconv_compile.explain" not in imported
