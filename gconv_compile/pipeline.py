"""``optimize`` and ``expand`` for the Python API, and the check every rewrite goes through.

:func:`run_checked` runs a model's reference in onnxruntime, applies a rewrite (the
:class:`~gconv_compile.targets.PassPlan` that :func:`gconv_compile.targets.passes_for_target`
chose) and compares; the CLI, :func:`optimize`, :func:`expand` and
:func:`gconv_compile.build.compile` all go through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import onnx
import onnx_ir as ir
from onnx_ir import external_data as ir_external_data

from gconv_compile.errors import CheckFailed
from gconv_compile.model_io import LoadedModel, count_nodes, gc_paused, load_model
from gconv_compile.profiles import Profile
from gconv_compile.reference import ReferenceRun, reference_source
from gconv_compile.report import Report
from gconv_compile.targets import passes_for_target

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
    reference is exactly what the user gave us. The check compares the graph outputs and each
    rewritten block's own output (:func:`rewritten_values`), every one with the calibrated rule
    of :mod:`gconv_compile.compare`: a wrong rewrite whose error is diluted below the float
    reordering noise of the final outputs (one channel's bias off by 1e-3 of its scale, 40
    layers deep) is still caught where it was made.

    Raises:
        CheckFailed: Some output differs beyond tolerance; the report carries the numbers.
        UserError: onnxruntime cannot run the input model.
    """
    model = loaded.model
    report.nodes_before = count_nodes(model)
    with contextlib.ExitStack() as stack:
        reference = None
        if check:
            before = reference_source(loaded, stack)
            # Run the reference now, while the model holds only the input's weights: after the
            # rewrite, new weights and onnxruntime's copy of the old ones would both be resident.
            reference = ReferenceRun(model, seeds=seeds, shapes=shapes, source=before)
        produced = _outputs_by_node(model)
        with gc_paused():
            rewrites, skips = rewrite(model)
        report.rewrites.extend(rewrites)
        report.skips.extend(skips)
        report.nodes_after = count_nodes(model)
        if not check:
            report.check_note = "not checked (--no-check)"
        elif not rewrites:
            report.check_note = "nothing rewritten, nothing to check"
        else:
            report.check = reference.check(model, rewritten_values(model, rewrites, produced))
            if not report.check.passed:
                raise CheckFailed("the rewritten model does not match the input", report)
    return model


def _outputs_by_node(model: ir.Model) -> dict[str, list[str]]:
    """The output names of each named node of the main graph, taken before a rewrite."""
    return {node.name: [v.name for v in node.outputs] for node in model.graph if node.name}


def rewritten_values(
    model: ir.Model, rewrites: Sequence, produced: Mapping[str, Sequence[str]]
) -> list[str]:
    """The values each rewrite of the main graph replaced under the same name (a fold's Concat
    output, an expanded Conv's output), which the check compares besides the graph outputs.

    Args:
        model: The model after the rewrite.
        rewrites: The rewrites (their ``anchor`` names a node of the model before).
        produced: :func:`_outputs_by_node` of the model before the rewrite.
    """
    now = {v.name for node in model.graph for v in node.outputs}
    names: list[str] = []
    for rewrite in rewrites:
        if rewrite.scope != model.graph.name:
            continue
        for name in produced.get(rewrite.anchor, ()):
            if name in now and name not in names:
                names.append(name)
    return names


def optimize(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    *,
    target: str | os.PathLike | Profile | None = None,
    check: bool = True,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    shapes: Mapping[str, Sequence[int]] | None = None,
    mixconv: str = "auto",
) -> tuple[onnx.ModelProto | ir.Model, Report]:
    """Fold split-conv-concat blocks into grouped Convs and check the result.

    Args:
        model: A path, an ``onnx.ModelProto`` (left unchanged) or an ``onnx_ir.Model``
            (rewritten in place).
        target: A target profile (built-in name, JSON path or :class:`Profile`): fold when it
            says so, then expand the grouped convolutions it cannot run. None: fold only.
        check: Compare the result with the input in onnxruntime on seeded random inputs.
        seeds: Seeds of the random input sets.
        shapes: Sizes for inputs with symbolic dims, by input name.
        mixconv: MixConv blocks (kernels embedded in the largest one): ``"auto"`` folds them
            when the target's cost estimate says the result is not slower, ``"always"`` or
            ``"never"``.

    Returns:
        The optimised model (an ``onnx.ModelProto`` when given one, else an ``onnx_ir.Model``)
        and the report.

    Raises:
        UserError: The model cannot be read or run, or the target profile is bad.
        CheckFailed: The rewritten model computes something else (``.report`` has details).
    """
    report = Report("optimize")
    plan = passes_for_target("optimize", target, warnings=report.warnings, mixconv=mixconv)
    report.target = plan.target
    loaded = load_model(model)
    report.input = str(loaded.path) if loaded.path else None
    result = run_checked(loaded, plan, report, check=check, seeds=seeds, shapes=shapes)
    return _like_input(model, result), report


def expand(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    *,
    mode: str | None = None,
    keep_depthwise: bool = False,
    min_group: int | None = None,
    max_group: int | None = None,
    skip: Sequence[str] = (),
    target: str | os.PathLike | Profile | None = None,
    check: bool = True,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[onnx.ModelProto | ir.Model, Report]:
    """Expand grouped Convs and ConvTransposes into ones without groups, and check the result.

    Args:
        model: A path, an ``onnx.ModelProto`` (left unchanged) or an ``onnx_ir.Model``
            (rewritten in place).
        mode: ``"split"`` (Split -> G Convs -> Concat) or ``"dense"`` (one block-diagonal
            Conv); default: the target's preference, else split.
        keep_depthwise: Leave depthwise convolutions (``group == C_in``) grouped.
        min_group: Only expand convolutions with at least this many groups.
        max_group: Only expand convolutions with at most this many groups.
        skip: Node names to leave alone.
        target: A target profile (built-in name, JSON path or :class:`Profile`): expand only
            what it cannot run.
        check: Compare the result with the input in onnxruntime on seeded random inputs.
        seeds: Seeds of the random input sets.
        shapes: Sizes for inputs with symbolic dims, by input name.

    Returns:
        The expanded model (an ``onnx.ModelProto`` when given one, else an ``onnx_ir.Model``)
        and the report; ``report.warnings`` names dense expansions that multiply the work.

    Raises:
        UserError: The model cannot be read or run, or an option or profile is bad.
        CheckFailed: The rewritten model computes something else (``.report`` has details).
    """
    report = Report("expand")
    plan = passes_for_target(
        "expand", target, mode=mode, keep_depthwise=keep_depthwise, min_group=min_group,
        max_group=max_group, skip=skip, warnings=report.warnings,
    )  # fmt: skip
    report.target = plan.target
    loaded = load_model(model)
    report.input = str(loaded.path) if loaded.path else None
    result = run_checked(loaded, plan, report, check=check, seeds=seeds, shapes=shapes)
    return _like_input(model, result), report


def _like_input(given: object, result: ir.Model) -> onnx.ModelProto | ir.Model:
    """An ``onnx.ModelProto`` for a proto caller (weights in it, not in a spill file)."""
    if not isinstance(given, onnx.ModelProto):
        return result
    ir_external_data.load_to_model(result)
    return ir.serde.serialize_model(result)
