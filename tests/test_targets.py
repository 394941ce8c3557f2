"""targets.passes_for_target: the one place that decides which passes a command runs."""

from __future__ import annotations

import pytest

from gconv_compile.errors import UserError
from gconv_compile.targets import passes_for_target


def _names(plan) -> list[str]:
    return [getattr(p, "__name__", type(p).__name__) for p in plan.passes]


@pytest.mark.parametrize(
    ("command", "target", "expected"),
    [
        ("optimize", None, ["FoldSplitConvConcat"]),
        ("optimize", "generic-npu", ["ExpandGroupedConv"] * 2),
        ("optimize", "llvm", ["FoldSplitConvConcat"]),
        ("expand", None, ["ExpandGroupedConv"]),
        ("expand", "generic-npu", ["ExpandGroupedConv"] * 2),
        ("compile", "llvm", ["LowerQOperatorToQDQ", "FoldSplitConvConcat", "FoldSliceBounds"]),
        (
            "compile",
            "cuda",
            ["LowerQOperatorToQDQ", "FoldSplitConvConcat", "_cuda_dense_passes", "FoldSliceBounds"],
        ),
        ("import", "llvm", ["ResolveConvTransposeOutputShape", "LowerQOperatorToQDQ"]),
        ("import", "cuda", ["ResolveConvTransposeOutputShape", "LowerQOperatorToQDQ"]),
    ],
    ids=lambda v: str(v),
)
def test_each_command_and_target_gets_its_passes(command, target, expected):
    assert _names(passes_for_target(command, target)) == expected


def test_a_target_that_runs_every_grouped_conv_expands_nothing_and_says_so():
    plan = passes_for_target("expand", "llvm")
    assert plan.passes == [] and plan.target == "llvm"
    assert plan.warnings == ["target 'llvm' runs every grouped convolution; nothing to expand"]


def test_expand_options_reach_the_pass():
    (expand,) = passes_for_target(
        "expand", mode="dense", keep_depthwise=True, min_group=2, max_group=8, skip=["a"]
    ).passes
    assert (expand.mode, expand.keep_depthwise, expand.min_group, expand.max_group) == (
        "dense", True, 2, 8,
    )  # fmt: skip
    assert expand.skip == frozenset({"a"})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "sparse"}, "expansion mode must be one of"),
        ({"min_group": 1}, "--min-group must be at least 2"),
        ({"min_group": 8, "max_group": 4}, "above --max-group"),
    ],
    ids=["bad-mode", "min-group-1", "empty-range"],
)
def test_bad_expand_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        passes_for_target("expand", **options)
