"""Shared pytest fixtures: the onnxruntime before/after comparison every rewrite test uses."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

# `import builders` from any test module, however pytest was started.
sys.path.insert(0, str(Path(__file__).parent))

# Hypothesis profiles "ci" and "long" must exist before --hypothesis-profile is applied.
import hypothesis_profiles  # noqa: E402, F401

from gconv_compile.verify import (  # noqa: E402
    CheckResult,
    compare_results,
    concrete_input_shapes,
    random_inputs,
    run_ort_model,
)


def assert_ort_equal(
    before: onnx.ModelProto,
    after: ir.Model | onnx.ModelProto,
    *,
    seeds: Sequence[int] = (0, 1),
    shapes: Mapping[str, Sequence[int]] | None = None,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> CheckResult:
    """onnxruntime (CPU EP, optimisations off) gives ``after`` the same outputs as ``before``.

    ``before`` is the model serialised before the pass ran; inputs are seeded normal noise
    (or ``feeds``); tolerances default to the product's per-type ones. Also asserts the reference outputs vary, so the comparison cannot pass on
    outputs that a wrong rewrite would reproduce by accident (all zeros, constants).
    """
    reference_model = ir.serde.deserialize_model(before)
    candidate = ir.serde.deserialize_model(after) if isinstance(after, onnx.ModelProto) else after
    if feeds is None:
        concrete = concrete_input_shapes(reference_model, shapes)
        feeds = [random_inputs(reference_model, seed, concrete) for seed in seeds]
    references = run_ort_model(reference_model, feeds, source=before.SerializeToString())
    candidates = run_ort_model(candidate, feeds)
    for name, value in references[0].items():
        assert np.asarray(value).size > 1 and np.std(value) > 0, f"output '{name}' is degenerate"
    stats = compare_results(references, candidates, atol=atol, rtol=rtol)
    result = CheckResult(stats, list(seeds), {})
    failures = [s.to_dict() for s in stats if not s.passed]
    assert result.passed, f"onnxruntime outputs differ after the rewrite: {failures}"
    return result


@pytest.fixture
def ort_equal():
    """``ort_equal(before_proto, after_model, **kw)``: see :func:`assert_ort_equal`."""
    return assert_ort_equal
