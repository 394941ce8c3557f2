"""What NCHWc activations would give the depthwise convs: a channel-vector schedule, per function.

Run: ``python benchmarks/nchwc_depthwise.py mobilenet|shufflenet [--mcpu haswell]``

onnxruntime keeps activations NCHW16c (AVX-512) between convs, and its depthwise kernel runs
on 16-channel vectors: no strided gather for stride 2, one contiguous padding copy. Every
depthwise conv of the model (as ``compile`` fuses it: bias, clip) is built here twice: as
``compile`` schedules it (NCHW, pixel vectors) and with its input, padded panel, output and
weight laid out NCHW{v}c / (C/v, 1, kh, kw, v) and scheduled on channel vectors (``schedule``
below: a tile of ``rows x cols`` pixels per task, taps unrolled, the padded panel of each task
copied a vector at a time). Each is timed alone (min of 40 runs, 2 threads) and the sum over the
model's calls printed. A prototype of the depthwise part of an NCHWc layout: it is not used by
``compile``; ``tests/test_nchwc_bound.py`` checks that it computes what the NCHW one does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]


def _tile(out_h: int, out_w: int, budget: int) -> tuple[int, int]:
    """(rows, cols) of output pixels per register tile: most accumulators within ``budget``,
    cols dividing the row."""
    best = (1, 1)
    for cols in [c for c in range(1, out_w + 1) if out_w % c == 0 and c <= budget]:
        for rows in [r for r in range(1, out_h + 1) if out_h % r == 0 and r * cols <= budget]:
            if rows * cols > best[0] * best[1]:
                best = (rows, cols)
    return best


def schedule(func, vector: int, registers: int = 32):
    """The depthwise conv of the unscheduled fused ``func`` on NCHW{vector}c channel vectors.

    Returns the scheduled function; its input, output and weight parameters change shape:
    ``(n, c, h, w) -> (n, c / v, h, w, v)``, weight ``(c, 1, kh, kw) -> (c / v, 1, kh, kw, v)``.
    """
    from tvm import s_tir

    from gconv_compile.tvm_schedules._conv import find_conv, single_epilogue

    sch = s_tir.Schedule(func)
    conv = find_conv(sch)
    if isinstance(conv, str) or conv.kind != "depthwise" or conv.out_channels % vector:
        raise ValueError(f"not a depthwise conv with channels in {vector}s: {conv}")
    v = vector
    blocked = lambda n, c, h, w: (n, c // v, h, w, c % v)  # noqa: E731
    epilogue = single_epilogue(sch, conv)
    sch.transform_layout(epilogue, ("write", 0), blocked)
    if conv.pad_block is not None:
        sch.transform_layout(conv.pad_block, ("read", 0), blocked)
        sch.transform_layout(conv.pad_block, ("write", 0), blocked)
        sch.transform_block_layout(conv.pad_block, blocked)
    else:
        index = [str(r.source.name) for r in sch.get(conv.block).reads].index(
            next(str(r.source.name) for r in sch.get(conv.block).reads
                 if len(r.source.shape) == 4 and str(r.source.name) != conv.weight_param)
        )  # fmt: skip
        sch.transform_layout(conv.block, ("read", index), blocked)
    w_index = [str(r.source.name) for r in sch.get(conv.block).reads].index(conv.weight_param)
    sch.transform_layout(conv.block, ("read", w_index), lambda o, i, h, w: (o // v, i, h, w, o % v))
    sch.transform_layout(conv.block, ("write", 0), blocked)
    rows, cols = _tile(conv.out_h, conv.out_w, registers - 10)
    n, f, y, x, rc, ry, rx = sch.get_loops(conv.block)
    f_o, f_v = sch.split(f, [None, v])
    y_o, y_r = sch.split(y, [None, rows])
    x_o, x_r = sch.split(x, [None, cols])
    sch.reorder(n, f_o, y_o, x_o, rc, ry, rx, y_r, x_r, f_v)
    task = sch.fuse(n, f_o, y_o)
    sch.parallel(task)
    for loop in (rc, ry, rx, y_r, x_r):
        sch.unroll(loop)
    sch.vectorize(f_v)
    init = sch.decompose_reduction(conv.block, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.reverse_compute_at(epilogue, x_o, preserve_unit_loops=True)
    e_loops = sch.get_loops(epilogue)
    e_f, e_y, e_x = e_loops[-3:]
    e_fo, e_fv = sch.split(e_f, [None, v])
    sch.reorder(e_fo, e_y, e_x, e_fv)
    for loop in (e_fo, e_y, e_x):
        sch.unroll(loop)
    sch.vectorize(e_fv)
    if conv.pad_block is not None:
        sch.compute_at(conv.pad_block, task, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(conv.pad_block)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("mobilenet", "shufflenet"))
    parser.add_argument("--mcpu", default=None, help="llvm CPU (default: this machine's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    import tvm
    from cpu_functions import _model, _time_us, scheduled_module
    from kernel_timing import machine_line
    from tvm.relax.frontend.onnx import from_onnx

    from gconv_compile import tvm_schedules
    from gconv_compile.tvm_schedules.cpu import vector_lanes

    target, mod, details, calls = scheduled_module(args.model, args.mcpu)
    with target:
        fused = from_onnx(_model(args.model), keep_params_in_input=False)
        fused = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(fused)
    lanes, registers = vector_lanes(target)
    print(machine_line())
    print(f"{args.model}, -mcpu={target.attrs['mcpu']}, {os.environ['TVM_NUM_THREADS']} threads")
    print(f"{'NCHW us':>8} {'NCHWc us':>8} {'ratio':>5} {'calls':>5}  function: schedule")
    totals = [0.0, 0.0]
    for gv, func in mod.functions_items():
        name = str(gv.name_hint)
        if "depthwise" not in details.get(name, ""):
            continue
        count = len(calls.get(name, [])) or 1
        try:
            nchwc = _time_us(schedule(fused[name], lanes, registers), target)
        except Exception as err:  # noqa: BLE001 - report the function and go on
            why = (str(err).strip().splitlines() or [""])[-1][:80]
            print(f"{'':>8} {'':>8} {'':>5} {count:5d}  {name}: no channel-vector form ({why})")
            continue
        nchw = _time_us(func, target)
        totals[0] += nchw * count
        totals[1] += nchwc * count
        print(f"{nchw:8.1f} {nchwc:8.1f} {nchwc / nchw:5.2f} {count:5d}  {name}: "
              f"{details[name][:80]}")  # fmt: skip
    print(f"depthwise functions, times calls: NCHW {totals[0]:.0f} us, on NCHWc channel vectors "
          f"{totals[1]:.0f} us ({totals[1] / max(totals[0], 1e-9):.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
