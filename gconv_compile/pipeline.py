"""The optimisation pipelines behind ``optimize`` (and later ``expand``), with their check."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

import onnx
import onnx_ir as ir

from gconv_compile.errors import CheckFailed
from gconv_compile.model_io import (
    ORT_MAX_IR_VERSION,
    LoadedModel,
    count_nodes,
    load_model,
    to_ort_source,
)
from gconv_compile.report import Report
from gconv_compile.verify import ReferenceRun
from passes import FoldSplitConvConcat

logger = logging.getLogger(__name__)

DEFAULT_SEEDS = (0, 1, 2)


def run_checked(
    loaded: LoadedModel,
    rewrite: Callable[[ir.Model], tuple[list, list]],
    report: Report,
    *,
    check: bool = True,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> ir.Model:
    """Apply ``rewrite`` to ``loaded.model`` in place and check it against the model before.

    ``rewrite`` returns (rewrites, skips). The model before the rewrite is serialised first (or,
    when it came from a file onnxruntime can read, that file is used as it is), so the
    reference is exactly what the user gave us.

    Raises:
        CheckFailed: Some output differs beyond tolerance; the report carries the numbers.
        UserError: onnxruntime cannot run the input model.
    """
    model = loaded.model
    report.nodes_before = count_nodes(model)
    with contextlib.ExitStack() as stack:
        before = None
        if check:
            if loaded.path is not None and model.ir_version <= ORT_MAX_IR_VERSION:
                before = str(loaded.path)
            else:
                workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gconv-before-"))
                before = to_ort_source(model, workdir)
        rewrites, skips = rewrite(model)
        report.rewrites.extend(rewrites)
        report.skips.extend(skips)
        report.nodes_after = count_nodes(model)
        if not check:
            report.check_note = "not checked (--no-check)"
        elif not rewrites:
            report.check_note = "nothing rewritten, nothing to check"
        else:
            reference = ReferenceRun(model, seeds=seeds, shapes=shapes, source=before)
            report.check = reference.check(model)
            if not report.check.passed:
                raise CheckFailed("the rewritten model does not match the input", report)
    return model


def fold(model: ir.Model) -> tuple[list, list]:
    """The fold pipeline: fold every split-conv-concat block."""
    fold_pass = FoldSplitConvConcat()
    ir.passes.PassManager([fold_pass])(model)
    return fold_pass.rewrites, fold_pass.skips


def optimize(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    *,
    check: bool = True,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[onnx.ModelProto | ir.Model, Report]:
    """Fold split-conv-concat blocks into grouped Convs and check the result.

    Args:
        model: A path, an ``onnx.ModelProto`` (left unchanged) or an ``onnx_ir.Model``
            (rewritten in place).
        check: Compare the result with the input in onnxruntime on seeded random inputs.
        seeds: Seeds of the random input sets.
        shapes: Sizes for inputs with symbolic dims, by input name.

    Returns:
        The optimised model (an ``onnx.ModelProto`` when given one, else an ``onnx_ir.Model``)
        and the report.

    Raises:
        UserError: The model cannot be read or run.
        CheckFailed: The rewritten model computes something else (``.report`` has details).
    """
    loaded = load_model(model)
    report = Report("optimize", input=str(loaded.path) if loaded.path else None)
    result = run_checked(loaded, fold, report, check=check, seeds=seeds, shapes=shapes)
    if isinstance(model, onnx.ModelProto):
        return ir.serde.serialize_model(result), report
    return result, report
