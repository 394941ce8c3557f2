"""``optimize`` on the real PyTorch exports of issue #11 items 1-3 (tests/fixtures/real).

* Caffe-style AlexNet with LocalResponseNorm: TorchScript's shape arithmetic used to crash the
  shape evaluator (item 1); its three group=2 convs are written as two channel slices each.
* One BN-fused conv shared by every chunk: TorchScript reads the shared weight through
  Identity (item 2).
* ShuffleNet v1: in the stride-2 unit one grouped 1x1 conv's branches share a Concat with the
  average-pool shortcut (TorchScript merges nested cats, item 3).

Each must fold the expected blocks, skip nothing, and pass the onnxruntime check ``optimize``
runs on the result (seeded random inputs, CPU EP, graph optimisations off).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import gconv_compile

REAL = Path(__file__).parent / "fixtures" / "real"

# architecture -> groups of the folded Convs, sorted
EXPECTED = {
    "alexnet_caffe": [2, 2, 2],
    "shared_conv_chunks": [4],
    "shufflenet_v1": [3, 3, 3, 3],
}


@pytest.mark.parametrize("exporter", ["ts17", "dynamo18"])
@pytest.mark.parametrize("architecture", list(EXPECTED))
def test_optimize_folds_the_real_export(architecture, exporter):
    path = REAL / f"{architecture}_{exporter}.onnx"
    before = onnx.load(path)
    optimized, report = gconv_compile.optimize(before)
    assert [s.reason for s in report.skips] == []
    folds = [r for r in report.rewrites if r.pass_name == "fold-split-conv-concat"]
    assert sorted(r.details["group"] for r in folds) == EXPECTED[architecture]
    assert report.check is not None and report.check.passed
    nodes = {n.name: n for n in optimized.graph.node}
    written = [
        next(a.i for a in nodes[r.details["new_node"]].attribute if a.name == "group")
        for r in folds
    ]
    assert sorted(written) == EXPECTED[architecture]


def test_shufflenet_v1_stride2_unit_folds_a_run_beside_the_shortcut():
    _, report = gconv_compile.optimize(onnx.load(REAL / "shufflenet_v1_ts17.onnx"))
    runs = [r for r in report.rewrites if "concat_inputs" in r.details]
    assert len(runs) == 1 and runs[0].details["group"] == 3
    assert runs[0].details["concat_inputs"] == [1, 4]  # input 0 is the average-pool shortcut
