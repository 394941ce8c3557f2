"""Comparing outputs: elementwise statistics, the calibrated allowance and the verdict.

Every check (``optimize``, ``expand``, ``compile`` and ``verify``) asks whether a candidate's
output ``a`` matches the reference ``b`` element by element, with NaN equal to NaN and inf to
the same inf. Each output gets Polygraphy's numbers (max and mean absolute error, max relative
error, the worst element) and its **margin**: the largest ``|a - b| / allowed`` over its
elements, the worst over all input sets. A margin above 1 fails.

The calibrated rule (the default)::

    allowed = max(atol, budget(dtype) * rms(b)) + rtol * |b|

``rms(b)`` is the root mean square of the reference output (its finite elements, per input
set). Why the allowance scales with the output's magnitude, and not with each element's: a
rewrite (or a compiler) that computes a convolution or a matrix product in another order changes
each sum of ``K`` products by a rounding error of about ``u * sqrt(K)`` times the size of the
terms (a random walk of ``K`` roundings; ``u`` is the unit roundoff, ``2**-24`` for float32).
That error is set by the size of the *terms*, which the output's RMS measures; an element that
happens to be near zero (a logit, a pre-activation) carries the same absolute error as its
neighbours, so an elementwise ``1e-4 * |b|`` refuses correct work. Through a network the errors
of each reduction on the way to an output add up (He-initialised or normalised layers keep the
relative size of an error about constant): the expected worst element is about
``4 * u * sum(sqrt(K_l))`` times the RMS, the sum running over the reductions on the longest path
(4 sigma for the largest of many elements). ResNeXt-50's longest path has ``sum(sqrt(K_l))``
~= 1030 (stem 7x7x3, three convs per bottleneck with K from 36 to 2048, the 2048-wide Gemm), so
float32 gets ``budget = 4096 * 2**-24 = 2**-12`` ~= 2.4e-4 of the RMS (float64: ``4096 * 2**-53``).
Measured: the branchy ResNeXt-50 folded into grouped convs differs from the input model by at
most 80 u times the RMS at any rewritten block and 13 u at the logits (margins ~0.02 and 0.004).
float16 and bfloat16 keep 1e-3 and 1e-2 of the RMS: their own ``rtol`` (1e-2, 5e-2) spans
tens of steps of their roundoff already. ``atol`` (float32: 1e-5) is the floor for outputs whose
RMS is tiny, ``rtol`` (float32: 1e-4) covers elements far above the RMS.

What it still catches: anything that moves some element by more than 2**-12 of its output's RMS.
A wrong channel order (one group's weights swapped with its neighbour's, a Concat in reverse
order), a wrong stride, pad or group count changes elements by the order of the RMS itself (a
margin in the thousands). A subtle error, such as one channel's bias off by 1e-3 of the
output's scale, moves that channel by ~4 times the allowance *at the rewritten block*, but
after 40 more layers it is diluted below the reordering noise of the final outputs; that is why
:mod:`gconv_compile.reference` also compares each rewritten block's own output (its name is kept
by every pass), exposed as an extra output of the model before and after the rewrite, with the
same rule and that value's own RMS.

Integer outputs: exact, except 8-, 16- and 4-bit integers, which are quantized values
(``QuantizeLinear``, ``QLinearConv``): they may differ by one step. ``QuantizeLinear`` rounds
``x / scale`` half to even; where a float sum lands within its rounding error of a tie (``k + 0.5``),
another summation order rounds it to the neighbouring step, and never further, since the float
error is far below one step. Anything else (a wrong weight, a wrong zero point) moves quantized
values by several steps. Other integer types (indices, shapes, counts) must be equal.

Explicit tolerances (``verify --atol/--rtol``, the ``atol``/``rtol`` arguments) override the
calibrated rule: an explicit ``atol`` is the absolute part as given (no RMS scaling), an explicit
``rtol`` the relative part; a tolerance not given keeps its calibrated value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

# (atol, rtol) by element type: the floor for outputs of tiny RMS and the part relative to each
# element. float32 is the product's contract: max(1e-5, 2**-12 * rms) + 1e-4 * |b|.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}
# The reordering budget in units of roundoff (see the module docstring): 4 * sum(sqrt(K_l)) for
# a path with sum(sqrt(K_l)) up to ~1024, ResNeXt-50's.
REORDER_BUDGET = 4096
# The absolute allowance as a fraction of the output's RMS, by element type.
RMS_TOLERANCES: dict[str, float] = {
    "float64": REORDER_BUDGET * 2.0**-53,
    "float32": REORDER_BUDGET * 2.0**-24,
    "float16": 1e-3,
    "bfloat16": 1e-2,
}
# Quantized integer types: one step may flip at a rounding tie.
QUANTIZED_TYPES = frozenset({"int8", "uint8", "int16", "uint16", "int4", "uint4"})
# (atol, rtol) of a TVM build against onnxruntime, by device and element type.
TVM_TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "cpu": {**DEFAULT_TOLERANCES, "float16": (1e-2, 1e-2)},
    "cuda": {**DEFAULT_TOLERANCES, "float32": (1e-4, 1e-3), "float16": (1e-2, 1e-2)},
}


@dataclasses.dataclass
class OutputStats:
    """How far one output of the candidate is from the reference (worst over all seeds).

    ``atol`` is the absolute allowance actually applied (after RMS scaling), ``rms`` the
    reference's RMS, ``margin`` the largest error / allowance (above 1 fails).
    """

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
    margin: float = 0.0
    rms: float = 0.0

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
        return cls(name, shape, dtype, inf, inf, inf, [], *tolerance, False, note=note, margin=inf)


@dataclasses.dataclass
class CheckResult:
    """The outcome of comparing a candidate with a reference over several input sets.

    ``values`` are the rewritten blocks' own outputs (intermediate values exposed for the
    check, see :mod:`gconv_compile.reference`); they must pass like the outputs.
    """

    outputs: list[OutputStats]
    seeds: list[int]
    input_shapes: dict[str, list[int]]
    reference: str = "onnxruntime CPU EP (ORT_DISABLE_ALL)"
    candidate: str = "onnxruntime CPU EP (ORT_DISABLE_ALL)"
    values: list[OutputStats] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(stat.passed for stat in [*self.outputs, *self.values])

    @property
    def margin(self) -> float:
        """The worst margin over outputs and rewritten values (0 when there are none)."""
        return max((stat.margin for stat in [*self.outputs, *self.values]), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "margin": self.margin,
            "rule": RULE,
            "reference": self.reference,
            "candidate": self.candidate,
            "seeds": self.seeds,
            "input_shapes": self.input_shapes,
            "outputs": [stat.to_dict() for stat in self.outputs],
            "rewritten_values": [stat.to_dict() for stat in self.values],
        }

    def summary(self) -> str:
        worst = max((s.max_abs_error for s in self.outputs), default=0.0)
        verdict = "match" if all(s.passed for s in self.outputs) else "MISMATCH"
        values = ""
        if self.values:
            bad = sum(not s.passed for s in self.values)
            values = f"; {len(self.values)} rewritten value(s) " + (
                f"MISMATCH ({bad} over their allowance)" if bad else "match"
            )
        return (
            f"{len(self.outputs)} output(s) {verdict} over {len(self.seeds)} seeded input "
            f"set(s); max abs error {worst:.3g}{values}; worst margin {self.margin:.3g} "
            "(error / allowed, above 1 fails)"
        )


RULE = "|a - b| <= max(atol, budget * rms(b)) + rtol * |b|; quantized ints: 1 step; ints: exact"


def tolerance_for(dtype: np.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``: the given ones, else the defaults; quantized integers: 1 step,
    other integers and booleans: exact."""
    name = np.dtype(dtype).name
    if name in QUANTIZED_TYPES:
        default_atol, default_rtol = 1.0, 0.0
    else:
        default_atol, default_rtol = DEFAULT_TOLERANCES.get(name, (0.0, 0.0))
    return (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)


def compare_arrays(
    name: str, ref: np.ndarray, cand: np.ndarray, *, atol: float | None, rtol: float | None
) -> OutputStats:
    """Elementwise comparison at |a - b| <= atol + rtol * |b|; NaN equals NaN, inf the same inf.

    ``atol``/``rtol`` None take :func:`tolerance_for`'s defaults, unscaled; the calibrated
    rule is :func:`compare_results`'s.
    """
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
    diff, magnitude = _differences(ref, cand)
    allowed = tol_a + tol_r * magnitude
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
        rel = diff / np.maximum(magnitude, np.finfo(np.float64).tiny)
    worst = np.unravel_index(int(np.argmax(ratio)), ref.shape)
    margin = float(ratio.max())
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
        passed=bool(margin <= 1.0),
        margin=margin,
        rms=reference_rms(ref),
    )


def _differences(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|a - b| (NaN vs NaN and inf vs the same inf: 0; any other NaN: inf) and |b| as float64."""
    if ref.dtype.kind in "biu":
        diff = np.abs(ref.astype(np.int64) - cand.astype(np.int64)).astype(np.float64)
        return diff, np.abs(ref.astype(np.float64))
    r64 = ref.astype(np.float64)
    c64 = cand.astype(np.float64)
    same = (r64 == c64) | (np.isnan(r64) & np.isnan(c64))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(r64 - c64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return diff, np.abs(np.where(np.isfinite(r64), r64, 0.0))


def merge_stats(per_seed: Sequence[Sequence[OutputStats]]) -> list[OutputStats]:
    """Keep, for each output, the worst statistics across seeds."""
    merged: list[OutputStats] = []
    for stats in zip(*per_seed):
        worst = max(stats, key=lambda s: (not s.passed, s.margin, s.max_abs_error))
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
    scale_atol: bool = True,
) -> list[OutputStats]:
    """Compare each input set's outputs; keep the worst statistics of each output.

    Args:
        references, candidates: Outputs by name, one mapping per input set.
        atol, rtol: Explicit tolerances for every output; they override the calibrated rule
            (an explicit atol is not scaled). None: ``tolerances`` by element type.
        tolerances: (atol, rtol) by element type.
        scale_atol: The calibrated rule: the absolute allowance is
            ``max(atol, RMS_TOLERANCES[dtype] * rms(reference))`` (module docstring). False:
            the table's atol as it is.
    """
    per_seed = []
    for ref, cand in zip(references, candidates):
        stats = []
        for name, ref_value in ref.items():
            if name not in cand:
                stats.append(OutputStats.failed(name, "missing from candidate", ref_value))
                continue
            ref_value = np.asarray(ref_value)
            tol_a, tol_r, note = _allowance(ref_value, atol, rtol, tolerances, scale_atol)
            stat = compare_arrays(name, ref_value, cand[name], atol=tol_a, rtol=tol_r)
            stat.note = stat.note or note
            stats.append(stat)
        per_seed.append(stats)
    return merge_stats(per_seed)


def _allowance(
    ref: np.ndarray,
    atol: float | None,
    rtol: float | None,
    tolerances: Mapping[str, tuple[float, float]],
    scale_atol: bool,
) -> tuple[float, float, str]:
    """(absolute allowance, rtol, a note saying where the allowance came from) for one output."""
    dtype = ref.dtype.name
    if dtype in QUANTIZED_TYPES:
        default_atol, default_rtol = 1.0, 0.0
    else:
        default_atol, default_rtol = tolerances.get(dtype, (0.0, 0.0))
    tol_r = default_rtol if rtol is None else rtol
    if atol is not None:
        return atol, tol_r, ""
    if dtype in QUANTIZED_TYPES:
        return default_atol, tol_r, "quantized: one step may flip at a rounding tie"
    fraction = RMS_TOLERANCES.get(dtype)
    if not scale_atol or fraction is None:
        return default_atol, tol_r, ""
    rms = reference_rms(ref)
    if fraction * rms <= default_atol:
        return default_atol, tol_r, ""
    note = f"atol {fraction:.3g} x output RMS {rms:.3g} (calibrated)"
    return fraction * rms, tol_r, note


def reference_rms(ref: np.ndarray) -> float:
    """RMS of the reference's finite elements (0 for integers and empty outputs)."""
    if ref.dtype.kind != "f" or ref.size == 0:
        return 0.0
    values = ref[np.isfinite(ref)].astype(np.float64)
    if values.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(values))))
