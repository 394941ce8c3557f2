"""Tests for gconv_compile.profiles and ``optimize --target``: built-in and user profiles, what
each target leaves grouped, bad profiles, and the ``profiles`` command."""

from __future__ import annotations

import json

import onnx
import pytest
from builders import split_conv_concat
from grouped_models import conv_chain, grouped_convs

import gconv_compile
from gconv_compile.cli import main
from gconv_compile.errors import UserError
from gconv_compile.profiles import Profile, builtin_names, load_profile

# name: (grouped Conv, grouped ConvTranspose, depthwise, preferred expansion, fold)
EXPECTED = {
    "generic-npu": (False, False, True, "split", False),
    "tflite": (True, False, True, "split", True),
    "nnapi": (False, False, True, "split", False),
    "cuda": (True, True, True, "split", True),
    "llvm": (True, True, True, "split", True),
}

MIXED = [
    ("g2", "Conv", 2, 8),
    ("dw", "Conv", 8, 16),  # depthwise with channel multiplier 2
    ("g4", "Conv", 4, 8),
    ("tg2", "ConvTranspose", 2, 8),
    ("tdw", "ConvTranspose", 8, 8),  # depthwise ConvTranspose
]
GOOD = {
    "supports_grouped_conv": False,
    "supports_grouped_conv_transpose": False,
    "supports_depthwise": True,
    "preferred_expansion": "dense",
    "max_dense_flop_multiplier": 4,
    "fold": False,
}


def write_profile(tmp_path, data, name="mine.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


# ------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_profiles_state_their_capabilities(name):
    profile = load_profile(name)
    assert profile.name == name and profile.source == "built-in"
    assert profile.description and "\n" not in profile.description
    got = (
        profile.supports_grouped_conv,
        profile.supports_grouped_conv_transpose,
        profile.supports_depthwise,
        profile.preferred_expansion,
        profile.fold,
    )
    assert got == EXPECTED[name]
    assert profile.max_dense_flop_multiplier >= 1


def test_builtin_names_are_the_package_data_files():
    assert set(EXPECTED) <= set(builtin_names())
    assert builtin_names() == sorted(builtin_names())


@pytest.mark.parametrize(
    ("name", "passes"),
    [
        pytest.param("generic-npu", [("Conv",), True, ("ConvTranspose",), False], id="generic-npu"),
        pytest.param("nnapi", [("Conv",), True, ("ConvTranspose",), False], id="nnapi"),
        pytest.param("tflite", [("ConvTranspose",), False], id="tflite"),
        pytest.param("cuda", [], id="cuda"),
        pytest.param("llvm", [], id="llvm"),
    ],
)
def test_expand_options_follow_the_capabilities(name, passes):
    options = load_profile(name).expand_options()
    flat = [item for option in options for item in (option["op_types"], option["keep_depthwise"])]
    assert flat == passes
    assert all(option["mode"] == "split" for option in options)
    assert all(option["mode"] == "dense" for option in load_profile(name).expand_options("dense"))


def test_user_profile_from_a_file(tmp_path):
    profile = load_profile(write_profile(tmp_path, GOOD, "my-npu.json"))
    assert profile.name == "my-npu"  # no name given: the file's stem
    assert profile.preferred_expansion == "dense" and profile.max_dense_flop_multiplier == 4.0
    assert profile.source.endswith("my-npu.json")
    named = load_profile(write_profile(tmp_path, {**GOOD, "name": "edge", "description": "x"}))
    assert (named.name, named.description) == ("edge", "x")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("{not json", "not valid JSON", id="not-json"),
        pytest.param("[1, 2]", "expected a JSON object", id="not-an-object"),
        pytest.param({**GOOD, "supports_groups": True}, "unknown field(s) ['supports_groups']",
                     id="unknown-field"),
        pytest.param({k: v for k, v in GOOD.items() if k != "fold"}, "missing field(s) ['fold']",
                     id="missing-field"),
        pytest.param({**GOOD, "fold": "yes"}, "'fold' must be true or false", id="fold-not-bool"),
        pytest.param({**GOOD, "preferred_expansion": "winograd"}, "'preferred_expansion' must be",
                     id="bad-expansion"),
        pytest.param({**GOOD, "max_dense_flop_multiplier": 0.5}, "must be a number >= 1",
                     id="multiplier-below-1"),
        pytest.param({**GOOD, "max_dense_flop_multiplier": True}, "must be a number >= 1",
                     id="multiplier-bool"),
        pytest.param({**GOOD, "name": ""}, "'name' must be a non-empty string", id="empty-name"),
        pytest.param({**GOOD, "supports_grouped_conv": True, "supports_depthwise": False},
                     "a depthwise conv is a grouped conv", id="contradiction"),
    ],
)  # fmt: skip
def test_bad_profile_files_are_user_errors(tmp_path, content, message):
    path = write_profile(tmp_path, content)
    with pytest.raises(UserError) as error:
        load_profile(path)
    assert message in str(error.value) and path in str(error.value)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        pytest.param(
            "tpu", "unknown target profile 'tpu'; built-in profiles are cuda", id="unknown"
        ),
        pytest.param("missing/npu.json", "'missing/npu.json': no such file", id="missing-file"),
        pytest.param("nothere.json", "'nothere.json': no such file", id="missing-json"),
    ],
)
def test_bad_profile_names_are_user_errors(target, message):
    with pytest.raises(UserError) as error:
        load_profile(target)
    assert message in str(error.value)


def test_profile_objects_pass_through():
    profile = load_profile("tflite")
    assert load_profile(profile) is profile
    assert isinstance(profile, Profile)


# ------------------------------------------------------------------------------ optimize --target


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_target_leaves_only_what_it_runs(name):
    """No grouped conv the target cannot run survives; the outputs still match."""
    profile = load_profile(name)
    proto = conv_chain(MIXED)
    result, report = gconv_compile.optimize(proto, target=name, seeds=(0,))
    assert report.target == name
    left = {conv_name: op for conv_name, op, *_ in grouped_convs(result)}
    for conv_name, op, *_ in MIXED:
        depthwise = conv_name in ("dw", "tdw")
        if op == "Conv":
            runs = profile.supports_grouped_conv or (depthwise and profile.supports_depthwise)
        else:
            runs = profile.supports_grouped_conv_transpose
        assert (conv_name in left) == runs, (conv_name, left)
    if report.rewrites:
        assert report.check is not None and report.check.passed
    else:  # the target runs everything: nothing to rewrite, nothing to check
        assert len(left) == len(MIXED) and report.check_note.startswith("nothing rewritten")


@pytest.mark.parametrize(
    ("name", "folded", "expanded"),
    [
        pytest.param("cuda", 1, 0, id="cuda-folds"),
        pytest.param("generic-npu", 0, 0, id="generic-npu-leaves-the-block"),
    ],
)
def test_target_folds_when_the_profile_says_so(name, folded, expanded):
    proto = split_conv_concat()
    _, report = gconv_compile.optimize(proto, target=name, seeds=(0,))
    kinds = [r.pass_name for r in report.rewrites]
    assert kinds.count("fold-split-conv-concat") == folded
    assert kinds.count("expand-grouped-conv") == expanded


def test_tflite_folds_then_expands_what_it_cannot_run():
    """A split-ConvTranspose-concat block folds to a grouped ConvTranspose, which TFLite lacks,
    so it is expanded again: the fold must not leave a node the target cannot run."""
    proto = split_conv_concat(transpose=True, conv_attrs={})
    result, report = gconv_compile.optimize(proto, target="tflite", seeds=(0,))
    assert [r.pass_name for r in report.rewrites] == [
        "fold-split-conv-concat",
        "expand-grouped-conv",
    ]
    assert grouped_convs(result) == []
    assert report.check.passed


def test_dense_profile_expands_dense_up_to_its_limit(tmp_path):
    path = write_profile(tmp_path, {**GOOD, "supports_depthwise": False})
    result, report = gconv_compile.optimize(conv_chain(MIXED), target=path, seeds=(0,))
    modes = {r.anchor: r.details["mode"] for r in report.rewrites}
    # group 2 and 4 fit the 4x limit; the two depthwise (group 8) are split instead.
    assert modes == {"g2": "dense", "g4": "dense", "tg2": "dense", "dw": "split", "tdw": "split"}
    assert [w for w in report.warnings if "4x the multiply-adds" in w] != []
    assert grouped_convs(result) == [] and report.check.passed


def test_optimize_without_target_only_folds():
    result, report = gconv_compile.optimize(conv_chain(MIXED), seeds=(0,))
    assert report.rewrites == [] and report.target is None
    assert len(grouped_convs(result)) == 5


# ------------------------------------------------------------------------------ CLI


def test_profiles_command_lists_every_profile(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        profile = load_profile(name)
        assert f"{name}  " in out and profile.description in out
        assert profile.capabilities() in out


def test_profiles_command_json_and_one_profile(capsys, tmp_path):
    assert main(["profiles", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in listed} >= set(EXPECTED)
    assert main(["profiles", write_profile(tmp_path, GOOD, "edge.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("edge") and "grouped Conv: no" in out


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["profiles", "tpu"], id="profiles-unknown"),
        pytest.param(["optimize", "IN", "-o", "OUT", "--target", "tpu"], id="optimize-unknown"),
        pytest.param(["optimize", "IN", "-o", "OUT", "--target", "BAD"], id="optimize-bad-file"),
        pytest.param(["expand", "IN", "-o", "OUT", "--target", "BAD"], id="expand-bad-file"),
    ],
)
def test_bad_targets_exit_2_with_one_line(argv, tmp_path, capsys):
    model = tmp_path / "in.onnx"
    onnx.save(conv_chain(MIXED), model)
    bad = write_profile(tmp_path, {**GOOD, "fold": 1})
    out = tmp_path / "out.onnx"
    argv = [{"IN": str(model), "OUT": str(out), "BAD": bad}.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gconv-compile: error: ")
    assert "profile" in err
    assert not out.exists()


def test_optimize_target_cli_writes_what_the_target_runs(tmp_path, capsys):
    model = tmp_path / "in.onnx"
    onnx.save(conv_chain(MIXED), model)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = ["optimize", str(model), "-o", str(out), "--target", "nnapi", "--report", str(report)]
    assert main([*argv, "--seeds", "1"]) == 0
    assert "summary:" in capsys.readouterr().out
    assert sorted(name for name, *_ in grouped_convs(onnx.load(out))) == ["dw"]
    data = json.loads(report.read_text())
    assert data["target"] == "nnapi" and data["summary"]["check_passed"] is True
    assert data["summary"]["rewrites"] == 4
