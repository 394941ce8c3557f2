"""The optimisation pipelines behind ``optimize`` and ``expand``, with their check."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

import onnx
import onnx_ir as ir
from onnx_ir import external_data as ir_external_data

from gconv_compile.errors import CheckFailed, UserError
from gconv_compile.model_io import (
    ORT_MAX_IR_VERSION,
    LoadedModel,
    count_nodes,
    load_model,
    to_ort_source,
)
from gconv_compile.passes import ExpandGroupedConv, FoldSplitConvConcat
from gconv_compile.passes.expand_grouped_conv import MODES
from gconv_compile.profiles import Profile, load_profile
from gconv_compile.report import Report
from gconv_compile.verify import ReferenceRun

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
        reference = None
        if check:
            if loaded.path is not None and model.ir_version <= ORT_MAX_IR_VERSION:
                before = str(loaded.path)
            else:
                workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gconv-before-"))
                before = to_ort_source(model, workdir)
            # Run the reference now, while the model holds only the input's weights: after the
            # rewrite, new weights and onnxruntime's copy of the old ones would both be resident.
            reference = ReferenceRun(model, seeds=seeds, shapes=shapes, source=before)
        rewrites, skips = rewrite(model)
        report.rewrites.extend(rewrites)
        report.skips.extend(skips)
        report.nodes_after = count_nodes(model)
        if not check:
            report.check_note = "not checked (--no-check)"
        elif not rewrites:
            report.check_note = "nothing rewritten, nothing to check"
        else:
            report.check = reference.check(model)
            if not report.check.passed:
                raise CheckFailed("the rewritten model does not match the input", report)
    return model


def fold(model: ir.Model) -> tuple[list, list]:
    """The fold pipeline: fold every split-conv-concat block."""
    fold_pass = FoldSplitConvConcat()
    ir.passes.PassManager([fold_pass])(model)
    return fold_pass.rewrites, fold_pass.skips


def expansion(
    passes: Sequence[ExpandGroupedConv],
    *,
    fold_first: bool = False,
    warnings: list[str] | None = None,
) -> Callable[[ir.Model], tuple[list, list]]:
    """A rewrite for :func:`run_checked`: optionally fold, then run ``passes`` in order.

    Args:
        passes: Configured expand passes (see :func:`expand_passes`).
        fold_first: Fold split-conv-concat blocks before expanding.
        warnings: Receives the passes' warnings (dense expansions that multiply the work).
    """

    def rewrite(model: ir.Model) -> tuple[list, list]:
        rewrites, skips = fold(model) if fold_first else ([], [])
        for expand_pass in passes:
            ir.passes.PassManager([expand_pass])(model)
            rewrites.extend(expand_pass.rewrites)
            skips.extend(expand_pass.skips)
            if warnings is not None:
                warnings.extend(expand_pass.warnings)
        return rewrites, skips

    return rewrite


def expand_passes(
    *,
    mode: str | None = None,
    keep_depthwise: bool = False,
    min_group: int | None = None,
    max_group: int | None = None,
    skip: Sequence[str] = (),
    target: Profile | None = None,
) -> list[ExpandGroupedConv]:
    """The expand passes for these options: one pass, or those a target profile asks for.

    With a ``target``, only the convolutions it cannot run are expanded, by its preferred
    expansion unless ``mode`` says otherwise; the other options narrow that further.

    Raises:
        UserError: An unknown mode or an empty group range.
    """
    if mode is not None and mode not in MODES:
        raise UserError(f"expansion mode must be one of {', '.join(MODES)}, got '{mode}'")
    for label, value in (("--min-group", min_group), ("--max-group", max_group)):
        if value is not None and value < 2:
            raise UserError(f"{label} must be at least 2 (group 1 is not grouped), got {value}")
    if min_group is not None and max_group is not None and min_group > max_group:
        raise UserError(f"--min-group {min_group} is above --max-group {max_group}")
    if target is None:
        options = [{"mode": mode or "split", "keep_depthwise": keep_depthwise}]
    else:
        options = target.expand_options(mode)
        for option in options:
            option["keep_depthwise"] = option["keep_depthwise"] or keep_depthwise
    return [
        ExpandGroupedConv(**option, min_group=min_group, max_group=max_group, skip=skip)
        for option in options
    ]


def expand_rewrite(
    report: Report,
    *,
    mode: str | None = None,
    keep_depthwise: bool = False,
    min_group: int | None = None,
    max_group: int | None = None,
    skip: Sequence[str] = (),
    target: str | os.PathLike | Profile | None = None,
) -> Callable[[ir.Model], tuple[list, list]]:
    """The ``expand`` rewrite for these options; notes the target and warnings in ``report``.

    Raises:
        UserError: A bad option or target profile.
    """
    profile = load_profile(target) if target is not None else None
    passes = expand_passes(
        mode=mode, keep_depthwise=keep_depthwise, min_group=min_group, max_group=max_group,
        skip=skip, target=profile,
    )  # fmt: skip
    if profile is not None:
        report.target = profile.name
        if not passes:
            report.warnings.append(
                f"target '{profile.name}' runs every grouped convolution; nothing to expand"
            )
    return expansion(passes, warnings=report.warnings)


def retarget(
    profile: Profile, *, mode: str | None = None, warnings: list[str] | None = None
) -> Callable[[ir.Model], tuple[list, list]]:
    """The ``optimize --target`` rewrite: fold if the profile says so, then expand what the
    target cannot run."""
    passes = expand_passes(mode=mode, target=profile)
    return expansion(passes, fold_first=profile.fold, warnings=warnings)


def optimize(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    *,
    target: str | os.PathLike | Profile | None = None,
    check: bool = True,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    shapes: Mapping[str, Sequence[int]] | None = None,
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

    Returns:
        The optimised model (an ``onnx.ModelProto`` when given one, else an ``onnx_ir.Model``)
        and the report.

    Raises:
        UserError: The model cannot be read or run, or the target profile is bad.
        CheckFailed: The rewritten model computes something else (``.report`` has details).
    """
    profile = load_profile(target) if target is not None else None
    loaded = load_model(model)
    report = Report("optimize", input=str(loaded.path) if loaded.path else None)
    rewrite = fold
    if profile is not None:
        report.target = profile.name
        rewrite = retarget(profile, warnings=report.warnings)
    result = run_checked(loaded, rewrite, report, check=check, seeds=seeds, shapes=shapes)
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
    rewrite = expand_rewrite(
        report, mode=mode, keep_depthwise=keep_depthwise, min_group=min_group,
        max_group=max_group, skip=skip, target=target,
    )  # fmt: skip
    loaded = load_model(model)
    report.input = str(loaded.path) if loaded.path else None
    result = run_checked(loaded, rewrite, report, check=check, seeds=seeds, shapes=shapes)
    return _like_input(model, result), report


def _like_input(given: object, result: ir.Model) -> onnx.ModelProto | ir.Model:
    """An ``onnx.ModelProto`` for a proto caller (weights in it, not in a spill file)."""
    if not isinstance(given, onnx.ModelProto):
        return result
    ir_external_data.load_to_model(result)
    return ir.serde.serialize_model(result)
