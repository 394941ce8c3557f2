"""The examples' models build and the commands their READMEs show do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gconv_compile", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _build(example: str, out: Path) -> Path:
    done = subprocess.run([sys.executable, str(EXAMPLES / example / "model.py"), str(out)])
    assert done.returncode == 0
    onnx.checker.check_model(onnx.load(out))
    return out


def test_01_chunked_conv_folds_every_block(tmp_path):
    model = _build("01_chunked_conv", tmp_path / "chunked_resnext.onnx")
    done = _cli("optimize", model, "-o", tmp_path / "folded.onnx")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("folded ") == 3 and "nodes 104 -> 32" in done.stdout
    folded = onnx.load(tmp_path / "folded.onnx")
    groups = [a.i for n in folded.graph.node for a in n.attribute if a.name == "group"]
    assert sorted(groups).count(8) == 3


def test_02_expand_for_npu_round_trips(tmp_path):
    model = _build("02_expand_for_npu", tmp_path / "grouped_block.onnx")
    npu = _cli("optimize", model, "-o", tmp_path / "npu.onnx", "--target", "generic-npu")
    assert npu.returncode == 0, npu.stderr
    assert npu.stdout.count("expanded ") == 2 and "depthwise" in npu.stdout
    dense = _cli("expand", model, "-o", tmp_path / "dense.onnx", "--mode", "dense")
    assert dense.returncode == 0 and "32x the multiply-adds" in dense.stdout
    back = _cli("optimize", tmp_path / "npu.onnx", "-o", tmp_path / "back.onnx")
    assert back.returncode == 0 and "2 blocks folded" in back.stdout
    original = {t.name: t for t in onnx.load(model).graph.initializer}
    weights = [
        n.input[1] for n in onnx.load(tmp_path / "back.onnx").graph.node if n.op_type == "Conv"
    ]
    restored = {t.name: t for t in onnx.load(tmp_path / "back.onnx").graph.initializer}
    # Every folded-back weight equals one of the original grouped weights, bit for bit.
    originals = [onnx.numpy_helper.to_array(t).tobytes() for t in original.values()]
    for name in weights:
        assert onnx.numpy_helper.to_array(restored[name]).tobytes() in originals
