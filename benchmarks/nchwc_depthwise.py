"""What NCHWc activations would give the depthwise convs: a channel-vector schedule, per function.

Run: ``python benchmarks/nchwc_depthwise.py mobilenet|shufflenet [--mcpu haswell]``

onnxruntime keeps activations NCHW16c (AVX-512) between convs, and its depthwise kernel runs
on 16-channel vectors: no strided gather for stride 2, one contiguous padding copy. Every
depthwise conv of the model (as ``compile`` fuses it: bias, clip) is built here twice: as
``compile`` schedules it (NCHW, pixel vectors) and with its input, padded panel, output and
weight laid out NCHW{v}c / (C/v, 1, kh, kw, v) and scheduled on channel vectors
(``cpu_nchwc.schedule_depthwise``: a tile of rows x cols pixels per task, taps unrolled, the
padded panel of each task copied a vector at a time), which ``compile`` uses inside NCHWc islands
(``gconv_compile/tvm_schedules/cpu_nchwc.py``). Each is timed alone (min of 40 runs, 2 threads)
and the sum over the model's calls printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("mobilenet", "shufflenet"))
    parser.add_argument("--mcpu", default=None, help="llvm CPU (default: this machine's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from cpu_functions import _time_us, scheduled_module
    from kernel_timing import machine_line

    from gconv_compile.tvm_schedules.cpu import vector_lanes
    from gconv_compile.tvm_schedules.cpu_nchwc import schedule_depthwise

    os.environ["GCONV_NCHWC"] = "0"  # the NCHW schedules to compare with
    target, mod, details, calls, fused = scheduled_module(args.model, args.mcpu)
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
            nchwc = _time_us(schedule_depthwise(fused[name], lanes, registers), target)
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
