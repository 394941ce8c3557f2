"""The expected verdicts of the real-architecture fixtures (issue #11 item 5).

``tests/fixtures/real/manifest.json`` says for every fixture what gconv-compile should do
(``expected``: blocks folded and their groups, the skip reasons of must-not-fold blocks, the
convs ``expand`` and ``optimize --target generic-npu`` split). Each case runs the Python API on
the fixture with the onnxruntime check on (a check failure raises ``CheckFailed``) and compares,
by the rules the manifest's ``mismatches`` use (``scripts/make_real_fixtures.py``).

MixConv blocks (mixnet, mixnet_dilated) are expected to be refused by the default
``mixconv="auto"``: folding embeds every kernel in the largest one, 1.8x and 5.4x the
multiply-adds, measured slower (``benchmarks/mixconv_cost.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import gconv_compile

FIXTURES = Path(__file__).parent / "fixtures" / "real"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
COMMANDS = ("optimize", "expand", "generic-npu")
CONVS = ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger")


def _run(path: Path, command: str):
    if command == "expand":
        return gconv_compile.expand(path)
    target = "generic-npu" if command == "generic-npu" else None
    return gconv_compile.optimize(path, target=target)


def _grouped_left(model) -> list[str]:
    """Convs (float or quantized) still grouped and not depthwise (one input channel a group)."""
    left = []
    for node in model.graph:
        group = node.attributes.get("group")
        if node.op_type not in CONVS or group is None or group.as_int() == 1:
            continue
        weight = node.inputs[3 if node.op_type == "QLinearConv" else 1]
        if weight.producer() is not None and weight.producer().op_type == "DequantizeLinear":
            weight = weight.producer().inputs[0]  # a QDQ weight: its integers' shape
        shape = weight.const_value.shape if weight.const_value is not None else weight.shape
        if shape is None or shape[1] != 1:
            left.append(node.name)
    return left


def _count(report, prefix: str) -> int:
    return sum(1 for r in report.rewrites if r.pass_name.startswith(prefix))


def _unmatched_refusals(refusals: list[str], reasons: list[str]) -> list[str]:
    """Each expected refusal needs a skip reason of its own holding one of its alternatives."""
    left, missing = list(reasons), []
    for refusal in refusals:
        match = next((r for r in left if any(alt in r for alt in refusal.split("|"))), None)
        if match is None:
            missing.append(refusal)
        else:
            left.remove(match)
    return missing


def _cases():
    for name in sorted(MANIFEST):
        for command in COMMANDS:
            yield pytest.param(name, command, id=f"{name[:-5]}-{command}")


@pytest.mark.parametrize(("name", "command"), list(_cases()))
def test_fixture_verdict(name, command):
    expected = MANIFEST[name]["expected"]
    model, report = _run(FIXTURES / name, command)
    if report.rewrites:  # nothing rewritten: nothing to check
        assert report.check is not None and report.check.passed
    if command == "optimize":
        groups = sorted(r.details["group"] for r in report.rewrites
                        if r.pass_name.startswith("fold"))  # fmt: skip
        assert (len(groups), groups) == (expected["folds"], sorted(expected["groups"])), [
            s.reason for s in report.skips
        ]
        reasons = [s.reason for s in report.skips]
        assert not _unmatched_refusals(expected["refusals"], reasons), reasons
    elif command == "expand":
        assert _count(report, "expand") == expected["expand_splits"]
    else:
        assert _count(report, "fold") == 0
        assert _count(report, "expand") == expected["generic_npu_splits"]
        assert _grouped_left(model) == [], "generic-npu leaves only depthwise grouped convs"
