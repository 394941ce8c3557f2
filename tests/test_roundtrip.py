"""fold ∘ expand: ``optimize(expand(m, mode="split"))`` gives back m's grouped convolutions (same
op, group and attributes, bit-equal weights and biases) and m's outputs; on generated models and
on the zoo models the onnx wheel ships (ShuffleNet v1, AlexNet) with seeded random weights.
Also the command-line end to end on those zoo models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from grouped_models import (
    assert_same_convs,
    assert_same_outputs,
    conv_chain,
    grouped_conv,
    grouped_convs,
    ort_run,
    random_feeds,
    zoo_model,
)

import gconv_compile
from gconv_compile.cli import main
from gconv_compile.compare import compare_results

GENERATED = [
    ("conv2d-g2", lambda: grouped_conv()),
    ("conv2d-g4-no-bias", lambda: grouped_conv(group=4, channels_out=8, bias=False)),
    ("conv1d", lambda: grouped_conv(kernel=(3,), spatial=(9,))),
    ("conv3d", lambda: grouped_conv(kernel=(1, 3, 3), spatial=(3, 5, 5))),
    ("depthwise-multiplier-3", lambda: grouped_conv(group=8, channels_out=24)),
    ("same-upper-stride2", lambda: grouped_conv(attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]})),
    ("dilated-asymmetric-pads", lambda: grouped_conv(attrs={"dilations": [2, 2], "pads": [0, 1, 2, 1]})),
    ("symbolic-spatial", lambda: grouped_conv(spatial=("H", "W"))),
    ("opset11", lambda: grouped_conv(opset=11)),
    ("opset18", lambda: grouped_conv(opset=18)),
    ("transpose", lambda: grouped_conv(transpose=True)),
    ("transpose-output-shape", lambda: grouped_conv(
        transpose=True, attrs={"strides": [2, 2], "output_shape": [15, 16]})),
    ("transpose-depthwise", lambda: grouped_conv(transpose=True, group=8, channels_out=16)),
    ("chain-of-five", lambda: conv_chain([
        ("g2", "Conv", 2, 8), ("dw", "Conv", 8, 16), ("g4", "Conv", 4, 8),
        ("tg2", "ConvTranspose", 2, 8), ("tdw", "ConvTranspose", 8, 8)])),
]  # fmt: skip


def round_trip(proto: onnx.ModelProto, seeds=(0,)):
    expanded, expand_report = gconv_compile.expand(proto, mode="split", seeds=seeds)
    folded, fold_report = gconv_compile.optimize(expanded, seeds=seeds)
    return expanded, expand_report, folded, fold_report


@pytest.mark.parametrize("build", [pytest.param(b, id=name) for name, b in GENERATED])
def test_fold_undoes_split_expansion(build):
    proto = build()
    grouped = len(grouped_convs(proto))
    expanded, expand_report, folded, fold_report = round_trip(proto)
    assert len(expand_report.rewrites) == grouped and grouped_convs(expanded) == []
    assert len(fold_report.rewrites) == grouped and not fold_report.skips
    assert [g[1:] for g in grouped_convs(folded)] == [g[1:] for g in grouped_convs(proto)]
    assert_same_convs(proto, folded)
    assert_same_outputs(proto, folded)


# ------------------------------------------------------------------------------ zoo models

ZOO = {
    # name: (grouped convs, of which depthwise)
    "light_shufflenet": (48, 16),
    "light_bvlc_alexnet": (3, 0),
}


@dataclasses.dataclass
class Zoo:
    """A zoo model with its reference outputs, computed once: AlexNet's 240 MB of weights make
    every onnxruntime session cost seconds, so each test adds one run, not two."""

    name: str
    proto: onnx.ModelProto
    path: Path
    feeds: dict
    outputs: dict

    def assert_same_outputs(self, model: onnx.ModelProto | ir.Model) -> None:
        stats = compare_results([self.outputs], [ort_run(model, self.feeds)])
        assert all(s.passed for s in stats), [s.to_dict() for s in stats]


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo(request, tmp_path_factory) -> Zoo:
    proto = zoo_model(request.param)
    path = tmp_path_factory.mktemp("zoo") / f"{request.param}.onnx"
    onnx.save(proto, path)
    feeds = random_feeds(proto, seed=1)
    return Zoo(request.param, proto, path, feeds, ort_run(proto, feeds))


def test_zoo_models_have_grouped_convs_and_random_weights(zoo):
    convs = grouped_convs(zoo.proto)
    assert len(convs) == ZOO[zoo.name][0]
    assert sum(group == channels for _, _, group, channels in convs) == ZOO[zoo.name][1]
    assert not any(n.op_type == "ConstantOfShape" for n in zoo.proto.graph.node)
    (probabilities,) = zoo.outputs.values()
    assert np.isfinite(probabilities).all() and np.std(probabilities) > 0
    assert probabilities.max() < 0.5, "softmax saturated: a channel-order bug could hide"


def test_zoo_round_trip_is_bit_exact(zoo):
    # The checks inside expand/optimize are off: bit-equal weights plus one comparison of the
    # final model against the original say more, at a third of the cost on AlexNet.
    expanded, expand_report = gconv_compile.expand(zoo.proto, mode="split", check=False)
    folded, fold_report = gconv_compile.optimize(expanded, check=False)
    assert len(expand_report.rewrites) == ZOO[zoo.name][0]
    assert grouped_convs(expanded) == []
    assert len(fold_report.rewrites) == ZOO[zoo.name][0] and not fold_report.skips
    assert assert_same_convs(zoo.proto, folded) == sum(
        n.op_type == "Conv" for n in zoo.proto.graph.node
    )
    assert len(folded.graph.node) == len(zoo.proto.graph.node)
    zoo.assert_same_outputs(folded)


def test_zoo_outputs_notice_a_channel_order_bug():
    """The control for the tests above: swapping two groups' outputs changes ShuffleNet's
    outputs, so equal outputs do mean equal channel order."""
    proto = zoo_model("light_shufflenet")
    expanded, _ = gconv_compile.expand(proto, mode="split", check=False)
    model = ir.serde.deserialize_model(expanded)
    concat = next(n for n in model.graph if n.op_type == "Concat" and len(n.inputs) == 4)
    first, second = concat.inputs[0], concat.inputs[1]
    concat.replace_input_with(0, second)
    concat.replace_input_with(1, first)
    feeds = random_feeds(proto)
    reference, broken = ort_run(proto, feeds), ort_run(model, feeds)
    (name,) = reference
    assert np.abs(reference[name] - broken[name]).max() > 1e-3


# ------------------------------------------------------------------------------ CLI end to end


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["expand"], id="expand-split"),
        pytest.param(["optimize", "--target", "generic-npu"], id="optimize-generic-npu"),
    ],
)
def test_cli_on_zoo_models(zoo, argv, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main([*argv, str(zoo.path), "-o", str(out), "--seeds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "MISMATCH" not in printed and "match over 1 seeded input set" in printed
    result = onnx.load(out)
    left = grouped_convs(result)
    if "generic-npu" in argv:  # depthwise kept, every other grouped Conv expanded
        assert len(left) == ZOO[zoo.name][1]
        assert all(group == channels for _, _, group, channels in left)
    else:
        assert left == []
    zoo.assert_same_outputs(result)


def test_cli_dense_on_shufflenet(tmp_path, capsys):
    """Dense expansion of ShuffleNet's depthwise convs does up to 544x the work: the report
    warns about each, and the outputs still match."""
    proto = zoo_model("light_shufflenet")
    source, out, report = tmp_path / "s.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(proto, source)
    argv = ["expand", str(source), "-o", str(out), "--mode", "dense", "--report", str(report)]
    assert main([*argv, "--seeds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "544x the multiply-adds" in printed
    data = json.loads(report.read_text())
    assert data["summary"]["check_passed"] is True and len(data["warnings"]) == 48
    assert_same_outputs(proto, onnx.load(out), seeds=(2,))
