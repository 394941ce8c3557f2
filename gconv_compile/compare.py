"""Comparing outputs: elementwise statistics and the pass/fail verdict, for every check.

A candidate's output ``a`` matches the reference ``b`` where |a - b| <= atol + rtol * |b|, with
NaN equal to NaN and inf to the same inf. Each output gets Polygraphy's numbers (max and mean
absolute error, max relative error, the worst element), the worst over all input sets.
``optimize``, ``expand`` and ``compile`` check their rewrites with :data:`DEFAULT_TOLERANCES`;
``verify`` compares a TVM build with :data:`TVM_TOLERANCES` and scales the default atol by the
output's RMS (see :mod:`gconv_compile.verify`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

# (atol, rtol) by element type. float32 is the product's contract: 1e-5 + 1e-4 * |b|.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}
# (atol, rtol) of a TVM build against onnxruntime, by device and element type.
TVM_TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "cpu": {**DEFAULT_TOLERANCES, "float16": (1e-2, 1e-2)},
    "cuda": {**DEFAULT_TOLERANCES, "float32": (1e-4, 1e-3), "float16": (1e-2, 1e-2)},
}


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
    tolerances: Mapping[str, tuple[float, float]] = DEFAULT_TOLERANCES,
    scale_atol: bool = False,
) -> list[OutputStats]:
    """Compare each input set's outputs; keep the worst statistics of each output.

    Args:
        references, candidates: Outputs by name, one mapping per input set.
        atol, rtol: Tolerances for every output (default: ``tolerances`` by element type).
        tolerances: (atol, rtol) by element type.
        scale_atol: Multiply the default atol by the output's RMS when that is above 1
            (rounding error grows with the size of the values); an explicit ``atol`` is used
            as given.
    """
    per_seed = []
    for ref, cand in zip(references, candidates):
        stats = []
        for name, ref_value in ref.items():
            if name not in cand:
                stats.append(OutputStats.failed(name, "missing from candidate", ref_value))
                continue
            ref_value = np.asarray(ref_value)
            default_atol, default_rtol = tolerances.get(ref_value.dtype.name, (0.0, 0.0))
            scale = output_scale(ref_value) if scale_atol and atol is None else 1.0
            stat = compare_arrays(
                name,
                ref_value,
                cand[name],
                atol=default_atol * scale if atol is None else atol,
                rtol=default_rtol if rtol is None else rtol,
            )
            if scale > 1.0:
                stat.note = f"default atol {default_atol:g} x output RMS {scale:.3g}"
            stats.append(stat)
        per_seed.append(stats)
    return merge_stats(per_seed)


def output_scale(ref: np.ndarray) -> float:
    """RMS of the reference (at least 1): float rounding grows with the size of the values."""
    if ref.dtype.kind != "f" or ref.size == 0:
        return 1.0
    values = ref[np.isfinite(ref)].astype(np.float64)
    if values.size == 0:
        return 1.0
    return max(1.0, float(np.sqrt(np.mean(np.square(values)))))
