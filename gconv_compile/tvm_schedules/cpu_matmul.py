"""llvm schedule for the classifier's matmul (``Gemm``/``MatMul`` after legalisation).

Legalised, the matmul is ``out[i, j] += a[i, k] * b[k, j]`` with ``k`` innermost, so every step
reads ``b`` a row apart (4 KB for a 1000-way classifier): MobileNetV2's 1280x1000 classifier ran
2.5 ms that way, slower than its heaviest conv. The schedule turns the loops around::

    for i, j_o (parallel):                      # j_o: a run of `unroll` vectors of outputs
        acc[u, j_v] = 0                         # registers
        for k:
            for u (unrolled), j_v (vectorised): # contiguous loads of b[k, ...]
                acc[u, j_v] += a[i, k] * b[k, j]
        out[i, j] = epilogue(acc)               # bias add (and what else was fused)
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx

logger = logging.getLogger(__name__)

_SPATIAL, _REDUCE = 0, 2


def _const(expr) -> int | None:
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _pow2_divisor(n: int, cap: int) -> int:
    v = 1
    while v * 2 <= cap and n % (v * 2) == 0:
        v *= 2
    return v


def schedule_matmul(func: tirx.PrimFunc, lanes: int) -> tuple[tirx.PrimFunc | None, str]:
    """Schedule a [S, S, R] matmul block (plus elementwise epilogue blocks) of ``func``.

    Returns:
        (scheduled function, what was done), or (None, why it does not apply).
    """
    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    kinds = [[int(iv.iter_type) for iv in sch.get(b).iter_vars] for b in blocks]
    if not kinds or kinds[0] != [_SPATIAL, _SPATIAL, _REDUCE]:
        return None, "not a matmul"
    if any(any(k != _SPATIAL for k in ks) for ks in kinds[1:]):
        return None, "non-elementwise block after the matmul"
    block = blocks[0]
    i, j, k = sch.get_loops(block)
    n = _const(sch.get(j).extent)
    if n is None or _const(sch.get(k).extent) is None:
        return None, "symbolic matmul size"
    # b must be read [k, j]: contiguous along the vectorised output axis
    iv = sch.get(block).iter_vars
    reads_kj = any(
        len(r.region) == 2 and r.region[0].min.same_as(iv[2].var)
        and r.region[1].min.same_as(iv[1].var)
        for r in sch.get(block).reads
    )  # fmt: skip
    if not reads_kj:
        return None, "matmul weight is not laid out [k, j]"
    vector = _pow2_divisor(n, lanes)
    if vector < 4:
        return None, f"{n} outputs do not split into vectors"
    unroll = max(d for d in range(1, 9) if (n // vector) % d == 0)
    try:
        for epi in blocks[1:-1]:
            sch.compute_inline(epi)
        if len(blocks) > 1:
            sch.set_scope(block, 0, "local")
            epilogue = blocks[-1]
        else:
            epilogue = sch.cache_write(block, 0, "local")
        j_o, j_u, j_v = sch.split(j, [None, unroll, vector])
        sch.reorder(i, j_o, k, j_u, j_v)
        sch.parallel(sch.fuse(i, j_o))
        sch.unroll(j_u)
        sch.vectorize(j_v)
        sch.decompose_reduction(block, k)
        anchor = sch.get_loops(block)[0]
        sch.reverse_compute_at(epilogue, anchor, preserve_unit_loops=True)
        e_loops = sch.get_loops(epilogue)[1:]
        e_u, e_v = sch.split(sch.fuse(*e_loops), [None, vector])
        sch.unroll(e_u)
        sch.vectorize(e_v)
    except Exception as err:  # noqa: BLE001 - TVM raises many kinds; keep the plain fallback
        logger.debug("matmul schedule failed: %s", err)
        return None, f"matmul schedule failed ({str(err).strip().splitlines()[0][:120]})"
    done = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return done, f"matmul {n} outputs: {unroll} x {vector}-wide vectors along outputs, parallel"
