"""The CLI's contract when a rewrite does not compute what the input computes: exit 1, the
report (with the numbers) is written, the output is not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import split_conv_concat
from gconv_compile.passes import FoldSplitConvConcat

from gconv_compile import cli, targets


class _BrokenFold(FoldSplitConvConcat):
    """The real fold, then a channel-order bug: the grouped weight's halves swapped."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        for node in model.graph:
            if node.op_type == "Conv":
                weight = node.inputs[1]
                array = weight.const_value.numpy()
                half = array.shape[0] // 2
                weight.const_value = ir.tensor(np.concatenate([array[half:], array[:half]]))
        return result


@pytest.mark.parametrize("command", ["optimize", "compile"])
def test_check_failure_exits_1_writes_report_not_output(command, tmp_path, monkeypatch, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(split_conv_concat(split_form="split13"), model)
    # Both commands get their passes from targets.passes_for_target.
    monkeypatch.setattr(targets, "FoldSplitConvConcat", _BrokenFold)
    out = tmp_path / ("out.onnx" if command == "optimize" else "out.so")
    report = tmp_path / "r.json"
    code = cli.main([command, str(model), "-o", str(out), "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 1
    assert "check failed" in captured.err and "nothing written" in captured.err
    assert "FAIL" in captured.out  # the per-output numbers are shown
    assert not out.exists()
    data = json.loads(report.read_text())
    assert data["check"]["passed"] is False
    assert data["check"]["outputs"][0]["max_abs_error"] > 1e-3
    assert data["check"]["outputs"][0]["margin"] > 1 and data["check"]["margin"] > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_report_and_output_get_the_umask_mode(tmp_path, mask):
    """Every output is written like `open(path, "w")` would: mode 0o666 & ~umask."""
    import os

    model = tmp_path / "m.onnx"
    onnx.save(split_conv_concat(), model)
    old = os.umask(mask)
    try:
        code = cli.main(["optimize", str(model), "-o", str(tmp_path / "o.onnx"),
                         "--report", str(tmp_path / "r.json")])  # fmt: skip
    finally:
        os.umask(old)
    assert code == 0
    for name in ("r.json", "o.onnx"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


MIXNET = Path(__file__).parent / "fixtures" / "real" / "mixnet_ts17.onnx"


@pytest.mark.parametrize(
    "flag, folds, reason",
    [([], 0, "would be slower"), (["--mixconv", "always"], 1, None),
     (["--mixconv", "never"], 0, "MixConv folding is off")],
    ids=["auto-refuses-a-slower-fold", "always", "never"],
)  # fmt: skip
def test_optimize_mixconv_flag(tmp_path, capsys, flag, folds, reason):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli.main(["optimize", str(MIXNET), "-o", str(out), "--report", str(report), *flag])
    assert code == 0, capsys.readouterr()
    data = json.loads(report.read_text())
    assert len(data["rewrites"]) == folds
    if reason:
        assert any(reason in skip["reason"] for skip in data["skipped"]), data["skipped"]


def test_compile_mixconv_flag_reaches_the_build(tmp_path, capsys):
    out = tmp_path / "m.so"
    code = cli.main(["compile", str(MIXNET), "-o", str(out), "--mixconv", "always"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "1 blocks folded" in printed or "1 block folded" in printed, printed
