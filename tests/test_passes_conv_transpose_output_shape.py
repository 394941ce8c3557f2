"""Tests for passes.resolve_conv_transpose_output_shape: output_shape -> explicit pads.

Positive cases: ``output_shape`` is gone, ``pads``/``output_padding`` are what the ONNX rule
gives, and onnxruntime (which honours ``output_shape``) computes the same outputs, of the
wanted size, on the model before the pass and after it. Negative cases: nothing changes and the
reason is recorded.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from gconv_compile.passes import PASSES, ResolveConvTransposeOutputShape
from grouped_models import grouped_conv, ort_run, random_feeds

# float32 ConvTranspose of at most 8 x 3 x 3 terms with N(0, 1/fan_in) weights: outputs are
# O(1), so a different summation order stays within a few ulps of 1e-6.
TOLERANCE = 1e-5

# case -> (grouped_conv keyword arguments, expected pads, expected output_padding)
RESOLVED = {
    # natural 15x15; H exact, W one smaller
    "pads-notset": ({"attrs": {"strides": [2, 2], "output_shape": [15, 14]}}, [0, 1, 0, 0], [0, 0]),
    "pads-same-upper": (
        {"attrs": {"strides": [2, 2], "output_shape": [14, 13], "auto_pad": "SAME_UPPER"}},
        [0, 1, 1, 1],
        [0, 0],
    ),
    "pads-same-lower": (
        {"attrs": {"strides": [2, 2], "output_shape": [14, 13], "auto_pad": "SAME_LOWER"}},
        [1, 1, 0, 1],
        [0, 0],
    ),
    # larger than natural (21x15): the difference becomes output_padding
    "output-padding": ({"attrs": {"strides": [3, 2], "output_shape": [22, 16]}}, [0] * 4, [1, 1]),
    "given-output-padding-kept-in-the-sum": (
        {"attrs": {"strides": [2, 2], "output_padding": [1, 1], "output_shape": [15, 15]}},
        [1, 1, 0, 0],
        [1, 1],
    ),
    "dilated": (
        {"attrs": {"strides": [2, 2], "dilations": [2, 2], "output_shape": [16, 15]}},
        [1, 1, 0, 1],
        [0, 0],
    ),
    "1d": (
        {"kernel": (3,), "spatial": (7,), "attrs": {"strides": [2], "output_shape": [13]}},
        [1, 1],
        [0],
    ),
    "3d": (
        {
            "kernel": (3, 1, 3),
            "spatial": (4, 5, 3),
            "attrs": {"strides": [2, 1, 2], "output_shape": [8, 5, 6]},
        },
        [1, 0, 1, 0, 0, 0],
        [0, 0, 0],
    ),
    "no-bias-group-1": (
        {"group": 1, "bias": False, "attrs": {"strides": [2, 2], "output_shape": [13, 15]}},
        [1, 0, 1, 0],
        [0, 0],
    ),
}


def run_pass(proto: onnx.ModelProto, **options):
    model = ir.serde.deserialize_model(proto)
    resolve = ResolveConvTransposeOutputShape(**options)
    return resolve(model), resolve


def serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def conv_transpose(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "ConvTranspose"]
    return node


@pytest.mark.parametrize("case", list(RESOLVED))
def test_output_shape_becomes_pads(case):
    build, pads, output_padding = RESOLVED[case]
    before = grouped_conv(transpose=True, **build)
    result, resolve = run_pass(before)

    assert result.modified is True and resolve.skips == []
    node = conv_transpose(result.model)
    assert "output_shape" not in node.attributes and "auto_pad" not in node.attributes
    assert list(node.attributes["pads"].as_ints()) == pads
    assert list(node.attributes["output_padding"].as_ints()) == output_padding
    assert node.name == "gconv" and node.attributes["group"].as_int() == build.get("group", 2)
    assert [r.anchor for r in resolve.rewrites] == ["gconv"]

    feeds = random_feeds(before, seed=3)
    want = ort_run(before, feeds)
    got = ort_run(result.model, feeds)
    wanted = build["attrs"]["output_shape"]
    assert list(want["C"].shape[2:]) == wanted
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=TOLERANCE, atol=TOLERANCE)


def test_symbolic_spatial_size_is_refused_with_the_reason():
    before = grouped_conv(
        transpose=True, spatial=("H", "W"), attrs={"strides": [2, 2], "output_shape": [15, 14]}
    )
    result, resolve = run_pass(before)
    assert result.modified is False
    assert [s.reason for s in resolve.skips] == [
        "gconv sets output_shape and its input's spatial size is not static"
    ]
    assert serialized(result.model) == serialized(ir.serde.deserialize_model(before))


def test_bound_input_shape_resolves_a_symbolic_spatial_size():
    before = grouped_conv(
        transpose=True, spatial=("H", "W"), attrs={"strides": [2, 2], "output_shape": [15, 14]}
    )
    result, resolve = run_pass(before, input_shapes={"X": [2, 8, 7, 7]})
    assert result.modified is True and resolve.skips == []
    assert list(conv_transpose(result.model).attributes["pads"].as_ints()) == [0, 1, 0, 0]
    feeds = {"X": np.random.default_rng(5).standard_normal((2, 8, 7, 7)).astype(np.float32)}
    want, got = ort_run(before, feeds), ort_run(result.model, feeds)
    assert want["Y"].shape == (2, 6, 15, 14)
    np.testing.assert_allclose(got["Y"], want["Y"], rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param({"transpose": True, "attrs": {"strides": [2, 2]}}, id="no-output-shape"),
        pytest.param({"transpose": False, "attrs": {"pads": [1] * 4}}, id="plain-conv"),
    ],
)
def test_nothing_to_resolve_is_left_alone_silently(build):
    """Expected = Before."""
    before = grouped_conv(**build)
    result, resolve = run_pass(before)
    assert result.modified is False and resolve.rewrites == [] and resolve.skips == []
    assert serialized(result.model) == serialized(ir.serde.deserialize_model(before))


def test_registered_under_its_cli_name():
    assert PASSES["resolve-conv-transpose-output-shape"] is ResolveConvTransposeOutputShape
