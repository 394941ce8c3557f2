"""Tests for the shared pass machinery: Refusal labels and the AnchoredPass loop."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import pytest
from gconv_compile.passes._common import NODE, Refusal
from gconv_compile.passes._driver import AnchoredPass, Match, Scope
from grouped_models import grouped_conv_in_function, grouped_conv_in_if


def _node(name: str | None, op_type: str = "Conv") -> ir.Node:
    return ir.node(op_type, [], name=name)


@pytest.mark.parametrize(
    ("reason", "node", "text"),
    [
        pytest.param(f"weight of {NODE} is not a constant", _node("c1"),
                     "weight of c1 is not a constant", id="label-inside"),
        pytest.param(f"{NODE}: strided slice (step 2)", _node(None, "Slice"),
                     "<unnamed Slice>: strided slice (step 2)", id="unnamed-node"),
        pytest.param("uneven split sizes [2, 4]", _node("s"), "uneven split sizes [2, 4]",
                     id="node-not-named-in-text"),
        pytest.param("branches mix {Conv} and ConvTranspose", None,
                     "branches mix {Conv} and ConvTranspose", id="no-node-braces-kept"),
    ],
)  # fmt: skip
def test_refusal_formats_the_label_once(reason, node, text):
    refusal = Refusal(reason, node)
    assert str(refusal) == text
    assert refusal.node is node and refusal.reason == reason


@dataclasses.dataclass
class _Seen(Match):
    scope: str = ""


class _RecordEveryConv(AnchoredPass):
    """Matches every Conv, refuses those named in ``refuse``; rewrites nothing."""

    pass_name = "test-driver"

    def __init__(self, refuse=(), **options):
        super().__init__(**options)
        self.refuse = set(refuse)

    def _is_anchor(self, node):
        return node.op_type == "Conv"

    def _match(self, node):
        if node.name in self.refuse:
            raise Refusal(f"{NODE} refused", node)
        return _Seen(node)

    def _rewrite(self, match: _Seen, scope: Scope):
        return [{"summary": f"seen in {scope.label} (function: {scope.in_function})"}]


@pytest.mark.parametrize(
    ("build", "options", "records"),
    [
        pytest.param(grouped_conv_in_if, {}, [("/then", "sub_conv", False)], id="if-branch"),
        pytest.param(grouped_conv_in_if, {"subgraphs": False}, [], id="subgraphs-off"),
        pytest.param(grouped_conv_in_function, {},
                     [("function local::GroupedBlock", "fconv", True)], id="function"),
        pytest.param(grouped_conv_in_function, {"functions": False}, [], id="functions-off"),
    ],
)  # fmt: skip
def test_driver_visits_every_scope_the_options_allow(build, options, records):
    model = ir.serde.deserialize_model(build())
    driver = _RecordEveryConv(**options)
    result = driver(model)
    assert result.modified is bool(records)
    assert len(driver.rewrites) == len(records)
    for rewrite, (scope, anchor, in_function) in zip(driver.rewrites, records):
        assert rewrite.pass_name == "test-driver"
        assert rewrite.scope.endswith(scope) and rewrite.anchor == anchor
        assert rewrite.summary == f"seen in {rewrite.scope} (function: {in_function})"


def test_driver_records_refusals_as_skips_under_the_anchor():
    model = ir.serde.deserialize_model(grouped_conv_in_function())
    driver = _RecordEveryConv(refuse={"fconv"})
    result = driver(model)
    assert result.modified is False and driver.rewrites == []
    assert [(s.pass_name, s.anchor, s.reason) for s in driver.skips] == [
        ("test-driver", "fconv", "fconv refused")
    ]
    # A second call starts from empty records.
    driver(model)
    assert len(driver.skips) == 1
