"""The ``verify`` command: a TVM build of a model against onnxruntime on the original model.

The reference is onnxruntime (all graph optimisations off) on the model exactly as the user gave
it: the CUDA execution provider, with TF32 off, when the candidate runs on a GPU, else the CPU
one. The candidate is the TVM library (given, or compiled now) on its target's device. Both see
the same inputs: the user's ``.npz``, or seeded random inputs with every symbolic dim bound.
Each output is compared like Polygraphy does: max and mean absolute error, max relative error,
the worst element, and pass/fail at |cand - ref| <= atol + rtol * |ref|.

Tolerances: the calibrated rule of :mod:`gconv_compile.compare`: every output may differ by
``max(atol, budget * rms) + rtol * |ref|``, with ``budget`` 2**-12 for float32 (4096 units of
roundoff: float reordering through a network as deep as ResNeXt-50, measured and derived there)
and ``rms`` the reference output's RMS; quantized integers by one step, other integers not at
all. (atol, rtol) are the product's CPU contract for float32 (1e-5, 1e-4) against the CPU
reference. On a GPU the CUDA C is built with fast math and sums in another order, so float32
gets (1e-4, 1e-3); float16 gets 1e-2 on either device (TVM may accumulate in float16). Each
output line shows its margin, error / allowed (above 1 fails).

``--atol``/``--rtol`` override the calibrated rule: an explicit atol is the absolute allowance
as given (not scaled by the RMS), an explicit rtol the relative part; a tolerance not given keeps
its calibrated value (so ``--rtol 0`` alone keeps the RMS-scaled atol, and ``--atol 0 --rtol 0``
asks for bitwise equality).

The reference run is :mod:`gconv_compile.reference`'s and the statistics
:mod:`gconv_compile.compare`'s, the same ones every rewrite's check uses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from gconv_compile.build import compile
from gconv_compile.compare import (
    TVM_TOLERANCES,
    CheckResult,
    OutputStats,
    compare_arrays,  # noqa: F401 - tests/test_fuzz.py imports it here
    compare_results,
)
from gconv_compile.errors import UserError
from gconv_compile.library import (
    LibraryInfo,
    RunFailed,
    Runner,
    TensorSpec,
    load_library,
    model_fingerprint,
    read_library_info,
)
from gconv_compile.model_io import LoadedModel, load_model
from gconv_compile.reference import (
    concrete_input_shapes,
    graph_inputs,
    random_inputs,
    run_reference,
)
from gconv_compile.report import Report
from gconv_compile.targets import cuda_available, default_target_kind

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Verification:
    """The outcome of :func:`verify`: the comparison, the report, and what was compared."""

    check: CheckResult
    report: Report
    reference: str
    candidate: str

    @property
    def passed(self) -> bool:
        return self.check.passed

    def lines(self) -> list[str]:
        """Polygraphy-style text: what ran, one line per output, a verdict."""
        check = self.check
        out = [f"{'reference':10} {self.reference}", f"{'candidate':10} {self.candidate}"]
        shapes = ", ".join(
            f"{name} [{'x'.join(map(str, dims))}]" for name, dims in check.input_shapes.items()
        )
        sets = (
            f"{len(check.seeds)} seeded set(s) (seeds {', '.join(map(str, check.seeds))})"
            if check.seeds
            else "1 set from --inputs"
        )
        out.append(f"{'inputs':10} {shapes}; {sets}")
        for stat in check.outputs:
            flag = "PASS" if stat.passed else "FAIL"
            where = f" at {stat.worst_index}" if stat.worst_index else ""
            out.append(
                f"{'output':10} {stat.name} {stat.dtype}[{'x'.join(map(str, stat.shape))}]: "
                f"max abs {stat.max_abs_error:.3g}, mean abs {stat.mean_abs_error:.3g}, "
                f"max rel {stat.max_rel_error:.3g}{where} "
                f"(atol {stat.atol:g}, rtol {stat.rtol:g}), margin {stat.margin:.3g} {flag}"
                + (f" - {stat.note}" if stat.note else "")
            )
        for warning in self.report.warnings:
            out.append(f"{'warning':10} {warning}")
        passed = sum(stat.passed for stat in check.outputs)
        verdict = "PASS" if check.passed else "FAIL"
        out.append(
            f"verify: {verdict}: {passed}/{len(check.outputs)} output(s) within tolerance "
            f"(worst margin {check.margin:.3g})"
        )
        return out


def verify(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    *,
    library: str | os.PathLike | None = None,
    target: str | None = None,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    atol: float | None = None,
    rtol: float | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    arch: str | None = None,
    optimize: bool = True,
    ignore_fingerprint: bool = False,
) -> Verification:
    """Compare a TVM build of ``model`` with onnxruntime on ``model``.

    Args:
        model: The original model (path, ``onnx.ModelProto`` or ``onnx_ir.Model``).
        library: A library written by ``compile``; without it the model is compiled now.
        target: Target to compile for when no library is given (default: cuda when a GPU is
            visible, else llvm).
        inputs: An ``.npz`` path or a name -> array mapping (one input set); default: seeded
            random inputs, one set per seed.
        seeds: Seeds of the random input sets.
        atol, rtol: Tolerances for every output; each one given overrides its part of the
            calibrated rule (default: by dtype and device, see :data:`TVM_TOLERANCES`, the
            absolute part scaled by each output's RMS).
        shapes: Sizes of inputs with symbolic dims (random inputs only).
        arch: CUDA architecture when compiling now.
        optimize: Fold before compiling (when compiling now).
        ignore_fingerprint: Accept a library compiled from another file with the same inputs
            and outputs (e.g. from a copy optimised separately).

    Returns:
        The verification; ``.passed`` says whether every output is within tolerance.

    Raises:
        UserError: Bad model, library, inputs or options (exit code 2).
    """
    if library is not None and target is not None:
        raise UserError("give --lib or --target, not both")
    if not seeds and inputs is None:
        raise UserError("--seeds must be at least 1")
    loaded = load_model(model)
    report = Report("verify", input=str(loaded.path) if loaded.path else None)
    timings: dict[str, float] = {}
    report.extra["timings"] = timings
    # Everything that can be bad input is checked before the slow parts run.
    info, kind, specs = _candidate_target(loaded, library, target, ignore_fingerprint)
    report.target = kind
    feeds_list, seed_list = _feeds(loaded, specs, inputs=inputs, seeds=seeds, shapes=shapes)

    started = time.perf_counter()
    if library is not None:
        runner = load_library(library)
        candidate = f"TVM {kind} library {library} on {runner.device_name}"
        report.extra["library"] = info.to_dict()
    else:
        runner = _compile_now(model, kind, report, arch=arch, optimize=optimize)
        candidate = f"TVM {kind} build (compiled now) on {runner.device_name}"
    timings["candidate_load_s"] = time.perf_counter() - started

    references, reference, stats = _compare(loaded, runner, feeds_list, kind, report, atol, rtol)
    shapes_fed = {name: list(value.shape) for name, value in feeds_list[0].items()}
    check = CheckResult(stats, seed_list, shapes_fed, reference=reference, candidate=candidate)
    report.check = check
    return Verification(check, report, reference, candidate)


def _compare(
    loaded: LoadedModel,
    runner: Runner,
    feeds_list: Sequence[Mapping[str, np.ndarray]],
    kind: str,
    report: Report,
    atol: float | None,
    rtol: float | None,
) -> tuple[list[dict[str, np.ndarray]], str, list[OutputStats]]:
    """Run the reference and the candidate on every input set and compare them."""
    timings = report.extra["timings"]
    started = time.perf_counter()
    references, reference, warning = run_reference(loaded, feeds_list, on_gpu=kind == "cuda")
    if warning:
        report.warnings.append(warning)
    timings["reference_s"] = time.perf_counter() - started

    started = time.perf_counter()
    candidates, failure = _run_candidate(runner, feeds_list)
    timings["candidate_run_s"] = time.perf_counter() - started
    if failure is not None:
        stats = [OutputStats.failed(name, failure, value) for name, value in references[0].items()]
    else:
        tolerances = TVM_TOLERANCES["cuda" if kind == "cuda" else "cpu"]
        stats = compare_results(
            references, candidates, atol=atol, rtol=rtol, tolerances=tolerances, scale_atol=True
        )
    return references, reference, stats


def _candidate_target(
    loaded: LoadedModel,
    library: str | os.PathLike | None,
    target: str | None,
    ignore_fingerprint: bool,
) -> tuple[LibraryInfo | None, str, list[TensorSpec]]:
    """The library's description (None when compiling now), the target kind, the input specs.

    Raises:
        UserError: A library of another model, or a CUDA candidate without a GPU here.
    """
    info = None
    if library is not None:
        info = read_library_info(library)
        _check_library_matches(loaded, info, library, ignore_fingerprint)
        specs, kind = info.inputs, info.target_kind
    else:
        kind = target or default_target_kind()
        specs = [TensorSpec.from_value(v) for v in graph_inputs(loaded.model)]
    if kind == "cuda" and not cuda_available():
        if library is not None:
            raise UserError(f"{library}: a CUDA library needs a GPU and none is visible")
        raise UserError("a CUDA build runs on a GPU and none is visible; verify with --target llvm")
    return info, kind, specs


def _feeds(
    loaded: LoadedModel,
    specs: Sequence[TensorSpec],
    *,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None,
    seeds: Sequence[int],
    shapes: Mapping[str, Sequence[int]] | None,
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """The input sets: the user's, or one seeded random set per seed."""
    if inputs is not None:
        if shapes:
            raise UserError("--shape applies to random inputs; --inputs fixes the shapes")
        return [_read_inputs(inputs, loaded.model, specs)], []
    bound = _library_bound_shapes(loaded.model, specs, shapes)
    input_shapes = concrete_input_shapes(loaded.model, bound)
    for spec in specs:
        if not spec.accepts(input_shapes[spec.name]):
            raise UserError(
                f"input '{spec.name}': shape {input_shapes[spec.name]} does not fit the "
                f"library's {spec.describe()}"
            )
    return [random_inputs(loaded.model, seed, input_shapes) for seed in seeds], list(seeds)


def _compile_now(model, kind: str, report: Report, *, arch: str | None, optimize: bool) -> Runner:
    """Compile the model for ``kind`` in memory (its rewrite is the comparison's subject, so it
    is not checked separately) and note what was rewritten."""
    compiled = compile(model, kind, arch=arch, optimize=optimize, check=False)
    report.rewrites.extend(compiled.report.rewrites)
    report.skips.extend(compiled.report.skips)
    report.nodes_before = compiled.report.nodes_before
    report.nodes_after = compiled.report.nodes_after
    report.extra["library"] = compiled.info.to_dict()
    return compiled.runner()


def _check_library_matches(
    loaded: LoadedModel, info, library: str | os.PathLike, ignore_fingerprint: bool
) -> None:
    """Refuse a library built from another model (by sha256, then by inputs and outputs)."""
    fingerprint = model_fingerprint(loaded)
    if info.model_sha256 != fingerprint and not ignore_fingerprint:
        source = f" ({info.model})" if info.model else ""
        raise UserError(
            f"{library} was compiled from a different model{source}: sha256 "
            f"{info.model_sha256[:12]}... != {fingerprint[:12]}... of this one "
            "(--ignore-fingerprint compares anyway)"
        )
    model_inputs = [TensorSpec.from_value(v) for v in graph_inputs(loaded.model)]
    model_outputs = [TensorSpec.from_value(v) for v in loaded.model.graph.outputs]
    for kind, ours, theirs in (
        ("inputs", model_inputs, info.inputs),
        ("outputs", model_outputs, info.outputs),
    ):
        ours_sig = [(t.name, t.dtype) for t in ours]
        theirs_sig = [(t.name, t.dtype) for t in theirs]
        if ours_sig != theirs_sig:
            raise UserError(
                f"{library} does not fit this model: its {kind} are "
                f"{[t.describe() for t in theirs]}, the model's are "
                f"{[t.describe() for t in ours]}"
            )


def _library_bound_shapes(
    model: ir.Model, specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]] | None
) -> dict[str, list[int]]:
    """User sizes first; else the sizes a library was built for, when it fixed them all."""
    bound = {name: list(dims) for name, dims in (shapes or {}).items()}
    model_inputs = {v.name: v for v in graph_inputs(model)}
    for spec in specs:
        value = model_inputs.get(spec.name)
        if spec.name in bound or value is None or value.shape is None or spec.shape is None:
            continue
        symbolic = any(not isinstance(d, int) for d in value.shape)
        if symbolic and all(isinstance(d, int) for d in spec.shape):
            bound[spec.name] = list(spec.shape)
    return bound


def _read_inputs(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    model: ir.Model,
    specs: Sequence[TensorSpec],
) -> dict[str, np.ndarray]:
    """Load an ``.npz`` (or take a mapping) and check it against the model and the library."""
    label = "--inputs"
    if isinstance(source, Mapping):
        arrays = {name: np.asarray(value) for name, value in source.items()}
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"{path}: not a readable .npz of arrays ({exc})")
    model_inputs = {v.name: v for v in graph_inputs(model)}
    missing = sorted(set(model_inputs) - set(arrays))
    unknown = sorted(set(arrays) - set(model_inputs))
    if missing or unknown:
        raise UserError(
            f"{label}: arrays must be named like the model's inputs {sorted(model_inputs)}; "
            f"missing {missing}, unknown {unknown}"
        )
    by_name = {spec.name: spec for spec in specs}
    for name, value in model_inputs.items():
        array = arrays[name]
        model_spec = TensorSpec.from_value(value)
        if array.dtype.name != model_spec.dtype:
            raise UserError(
                f"{label}: '{name}' is {array.dtype.name}, the model takes {model_spec.dtype}"
            )
        for spec in (model_spec, by_name.get(name)):
            if spec is not None and not spec.accepts(array.shape):
                raise UserError(
                    f"{label}: '{name}' has shape {list(array.shape)}, expected {spec.describe()}"
                )
    return arrays


def _run_candidate(
    runner: Runner, feeds_list: Sequence[Mapping[str, np.ndarray]]
) -> tuple[list[dict[str, np.ndarray]], str | None]:
    results = []
    for feeds in feeds_list:
        try:
            results.append(runner.run(feeds))
        except RunFailed as exc:
            return results, str(exc)
    return results, None
