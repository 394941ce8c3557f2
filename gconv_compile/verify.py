"""Numeric comparison of models with onnxruntime.

Every rewrite is checked the same way: onnxruntime (CPU EP, all graph optimisations off) runs the
model as it was before the rewrite and as it is after, on seeded random inputs, and each output
is compared elementwise with |a - b| <= atol + rtol * |b| (``b`` is the reference).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from gconv_compile.errors import UserError
from gconv_compile.model_io import to_ort_source

logger = logging.getLogger(__name__)

# (atol, rtol) by element type. float32 is the product's contract: 1e-5 + 1e-4 * |b|.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}
DEFAULT_BATCH = 2
DEFAULT_SYMBOLIC_DIM = 16


@dataclasses.dataclass
class OutputStats:
    """How far one output of the candidate is from the reference (worst over all seeds)."""

    name: str
    shape: list[int]
    dtype: str
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    worst_index: list[int]
    atol: float
    rtol: float
    passed: bool
    note: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def failed(
        cls, name: str, note: str, reference: np.ndarray | None = None, tolerance=(0.0, 0.0)
    ) -> OutputStats:
        """An output that could not be compared at all (missing, wrong shape, run failed)."""
        shape = list(np.shape(reference)) if reference is not None else []
        dtype = str(np.asarray(reference).dtype) if reference is not None else ""
        inf = float("inf")
        return cls(name, shape, dtype, inf, inf, inf, [], *tolerance, False, note=note)


@dataclasses.dataclass
class CheckResult:
    """The outcome of comparing a candidate with a reference over several input sets."""

    outputs: list[OutputStats]
    seeds: list[int]
    input_shapes: dict[str, list[int]]
    reference: str = "onnxruntime CPU EP (ORT_DISABLE_ALL)"
    candidate: str = "onnxruntime CPU EP (ORT_DISABLE_ALL)"

    @property
    def passed(self) -> bool:
        return all(stat.passed for stat in self.outputs)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "seeds": self.seeds,
            "input_shapes": self.input_shapes,
            "outputs": [stat.to_dict() for stat in self.outputs],
        }

    def summary(self) -> str:
        worst = max((s.max_abs_error for s in self.outputs), default=0.0)
        verdict = "match" if self.passed else "MISMATCH"
        return (
            f"{len(self.outputs)} output(s) {verdict} over {len(self.seeds)} seeded input "
            f"set(s); max abs error {worst:.3g}"
        )


def parse_shape_overrides(specs: Sequence[str] | None) -> dict[str, list[int]]:
    """Parse ``name=1x3x224x224`` strings into a mapping."""
    overrides: dict[str, list[int]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition("=")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise UserError(f"--shape '{spec}': expected NAME=DIMxDIMx..., e.g. x=1x3x224x224")
        overrides[name] = [int(d) for d in dims.split("x")]
    return overrides


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """Inputs a caller must feed (initializers listed as inputs are optional and skipped)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def concrete_input_shapes(
    model: ir.Model, overrides: Mapping[str, Sequence[int]] | None = None
) -> dict[str, list[int]]:
    """Bind every symbolic dim: same symbol, same size; batch 2, other symbols 16."""
    overrides = dict(overrides or {})
    bound: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    names = {v.name for v in graph_inputs(model)}
    unknown = set(overrides) - names
    if unknown:
        raise UserError(
            f"--shape names unknown input(s) {sorted(unknown)}; inputs are {sorted(names)}"
        )
    for value in graph_inputs(model):
        if value.name in overrides:
            dims = list(overrides[value.name])
            if value.shape is not None and len(value.shape) != len(dims):
                raise UserError(
                    f"--shape {value.name}: rank {len(dims)} given, model input has rank "
                    f"{len(value.shape)}"
                )
            if value.shape is not None:
                for dim, size in zip(value.shape, dims):
                    if isinstance(dim, int) and dim != size:
                        raise UserError(
                            f"--shape {value.name}: {'x'.join(map(str, dims))} conflicts with "
                            f"the static shape {value.shape}"
                        )
                    if not isinstance(dim, int) and dim.value is not None:
                        bound.setdefault(dim.value, size)
            shapes[value.name] = dims
            continue
        if value.shape is None:
            raise UserError(f"input '{value.name}' has no shape; give one with --shape")
        dims = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(dim)
                continue
            default = DEFAULT_BATCH if axis == 0 else DEFAULT_SYMBOLIC_DIM
            if dim.value is None:
                dims.append(default)
            else:
                dims.append(bound.setdefault(dim.value, default))
        shapes[value.name] = dims
    return shapes


def random_inputs(
    model: ir.Model, seed: int, shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """Seeded random feeds: normal floats, small non-negative integers, random booleans."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in graph_inputs(model):
        dims = tuple(shapes[value.name])
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(dims) < 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, 4, size=dims).astype(dtype)
        else:
            raise UserError(f"input '{value.name}': cannot make random data of type {dtype}")
    return feeds


def ort_session(source: str | bytes, providers: Sequence[str] | None = None):
    """An onnxruntime session with every graph optimisation off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = min(4, os.cpu_count() or 1)
    return ort.InferenceSession(
        source, options, providers=list(providers or ["CPUExecutionProvider"])
    )


def run_ort_model(
    model: ir.Model,
    feeds_list: Sequence[Mapping[str, np.ndarray]],
    *,
    source: str | bytes | None = None,
    providers: Sequence[str] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run ``model`` (or the already serialised ``source``) on each feed dict."""
    with tempfile.TemporaryDirectory(prefix="gconv-ort-") as workdir:
        if source is None:
            source = to_ort_source(model, workdir)
        session = ort_session(source, providers)
        names = [o.name for o in session.get_outputs()]
        results = []
        for feeds in feeds_list:
            values = session.run(names, dict(feeds))
            results.append(dict(zip(names, values)))
        return results


def tolerance_for(dtype: np.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    default_atol, default_rtol = DEFAULT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))
    return (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)


def compare_arrays(
    name: str, ref: np.ndarray, cand: np.ndarray, *, atol: float | None, rtol: float | None
) -> OutputStats:
    """Elementwise comparison; NaN equals NaN, inf equals the same inf."""
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    tol_a, tol_r = tolerance_for(ref.dtype, atol, rtol)
    if ref.shape != cand.shape:
        note = f"shape {list(cand.shape)} != reference {list(ref.shape)}"
        return OutputStats.failed(name, note, ref, (tol_a, tol_r))
    if ref.size == 0:
        return OutputStats(
            name, list(ref.shape), str(ref.dtype), 0.0, 0.0, 0.0, [], tol_a, tol_r, True
        )
    if ref.dtype.kind in "biu":
        diff = np.abs(ref.astype(np.int64) - cand.astype(np.int64)).astype(np.float64)
        magnitude = np.abs(ref.astype(np.float64))
    else:
        r64 = ref.astype(np.float64)
        c64 = cand.astype(np.float64)
        same = (r64 == c64) | (np.isnan(r64) & np.isnan(c64))
        diff = np.where(same, 0.0, np.abs(r64 - c64))
        diff = np.where(np.isnan(diff), np.inf, diff)
        magnitude = np.abs(np.where(np.isfinite(r64), r64, 0.0))
    allowed = tol_a + tol_r * magnitude
    rel = diff / np.maximum(magnitude, np.finfo(np.float64).tiny)
    worst = np.unravel_index(int(np.argmax(diff - allowed)), ref.shape)
    return OutputStats(
        name=name,
        shape=list(ref.shape),
        dtype=str(ref.dtype),
        max_abs_error=float(diff.max()),
        mean_abs_error=float(diff.mean()),
        max_rel_error=float(rel.max()),
        worst_index=[int(i) for i in worst],
        atol=tol_a,
        rtol=tol_r,
        passed=bool(np.all(diff <= allowed)),
    )


def merge_stats(per_seed: Sequence[Sequence[OutputStats]]) -> list[OutputStats]:
    """Keep, for each output, the worst statistics across seeds."""
    merged: list[OutputStats] = []
    for stats in zip(*per_seed):
        worst = max(stats, key=lambda s: (not s.passed, s.max_abs_error))
        worst = dataclasses.replace(
            worst,
            mean_abs_error=float(np.mean([s.mean_abs_error for s in stats])),
            max_rel_error=max(s.max_rel_error for s in stats),
            passed=all(s.passed for s in stats),
        )
        merged.append(worst)
    return merged


def compare_results(
    references: Sequence[Mapping[str, np.ndarray]],
    candidates: Sequence[Mapping[str, np.ndarray]],
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> list[OutputStats]:
    per_seed = []
    for ref, cand in zip(references, candidates):
        stats = []
        for name, ref_value in ref.items():
            if name not in cand:
                stats.append(OutputStats.failed(name, "missing from candidate", ref_value))
                continue
            stats.append(compare_arrays(name, ref_value, cand[name], atol=atol, rtol=rtol))
        per_seed.append(stats)
    return merge_stats(per_seed)


class ReferenceRun:
    """Reference outputs of a model, computed once before a rewrite mutates it."""

    def __init__(
        self,
        model: ir.Model,
        *,
        seeds: Sequence[int] = (0, 1, 2),
        shapes: Mapping[str, Sequence[int]] | None = None,
        source: str | bytes | None = None,
    ) -> None:
        self.seeds = list(seeds)
        self.shapes = concrete_input_shapes(model, shapes)
        self.feeds = [random_inputs(model, seed, self.shapes) for seed in self.seeds]
        try:
            self.outputs = run_ort_model(model, self.feeds, source=source)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                "onnxruntime cannot run the input model, so the rewrite cannot be checked "
                f"({_first_line(exc)}); pass --no-check to skip the check"
            ) from exc

    def check(self, candidate: ir.Model) -> CheckResult:
        """Run ``candidate`` on the same inputs and compare."""
        try:
            outputs = run_ort_model(candidate, self.feeds)
        except Exception as exc:
            note = f"onnxruntime failed on the rewritten model: {_first_line(exc)}"
            failed = [
                OutputStats.failed(name, note, value) for name, value in self.outputs[0].items()
            ]
            return CheckResult(failed, self.seeds, self.shapes)
        return CheckResult(compare_results(self.outputs, outputs), self.seeds, self.shapes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
