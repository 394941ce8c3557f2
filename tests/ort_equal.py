"""The one onnxruntime-equality helper of the tests: ``before`` and ``after`` give the same outputs.

It runs the product's own reference path (:mod:`gconv_compile.reference`) and comparison
(:mod:`gconv_compile.compare`), so a test checks a rewrite exactly as ``optimize`` does.
``conftest.py`` offers it as the ``ort_equal`` fixture; ``grouped_models.assert_same_outputs``
is this function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from gconv_compile.compare import CheckResult, compare_results
from gconv_compile.model_io import ORT_MAX_IR_VERSION
from gconv_compile.reference import concrete_input_shapes, random_inputs, run_ort_model


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
    (or ``feeds``); tolerances default to the product's calibrated rule (float32:
    ``max(1e-5, 2**-12 * rms) + 1e-4 * |b|``, quantized integers one step, see
    :mod:`gconv_compile.compare`), and an explicit ``atol``/``rtol`` overrides its part. Also asserts the
    reference outputs vary, so the comparison cannot pass on outputs that a wrong rewrite would
    reproduce by accident (all zeros, constants).
    """
    reference_model = ir.serde.deserialize_model(before)
    candidate = ir.serde.deserialize_model(after) if isinstance(after, onnx.ModelProto) else after
    if feeds is None:
        concrete = concrete_input_shapes(reference_model, shapes)
        feeds = [random_inputs(reference_model, seed, concrete) for seed in seeds]
    # onnxruntime reads IR versions up to ORT_MAX_IR_VERSION; run_ort_model lowers newer ones.
    source = before.SerializeToString() if before.ir_version <= ORT_MAX_IR_VERSION else None
    references = run_ort_model(reference_model, feeds, source=source)
    candidates = run_ort_model(candidate, feeds)
    for name, value in references[0].items():
        assert np.asarray(value).size > 1 and np.std(value) > 0, f"output '{name}' is degenerate"
    stats = compare_results(references, candidates, atol=atol, rtol=rtol)
    result = CheckResult(stats, list(seeds), {})
    failures = [s.to_dict() for s in stats if not s.passed]
    assert result.passed, f"onnxruntime outputs differ after the rewrite: {failures}"
    return result
