"""What NCHWc activations would save the channel-form convs: an upper bound, per function.

Run: ``python benchmarks/nchwc_bound.py resnext|mobilenet|shufflenet [--mcpu haswell]``

A channel-form conv (vectors along output channels) stores its NCHW output lane by lane. With
the output blocked NCHW{v}c, as onnxruntime keeps its activations, those become whole-vector
stores. This builds every channel-form function of the model twice, as ``compile`` schedules
it and with its output (and a residual operand, read in the epilogue) re-laid out as
``(n, c // v, h, w, c % v)`` and the epilogue's channel loop vectorised, times each alone
(``cpu_functions._time_us``: min of 40 runs, warm caches, 2 threads) and prints both, their
ratio and the model's sum (times its calls). The blocked build costs nothing to convert to or
from: it is the saving left for the store side of an NCHWc layout, not what a model would run
in (its consumers would have to read NCHWc too). Outputs are not compared: only speed is asked.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]


def _blocked(func, vector: int):
    """``func`` with its last output and any 4-D feature-map input of the epilogue NCHW{v}c."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    (epilogue,) = sch.get_output_blocks(sch.get_sblock("root"))
    block = sch.get(epilogue)
    out_shape = [int(d) for d in block.writes[0].source.shape]
    blocked = lambda n, c, h, w: (n, c // vector, h, w, c % vector)  # noqa: E731
    if len(out_shape) == 3:  # a 1x1 conv's flattened-pixel epilogue writes [n, c, hw]: same map
        blocked = lambda n, c, p: (n, c // vector, p, c % vector)  # noqa: E731
    sch.transform_layout(epilogue, ("write", 0), blocked)
    for i, region in enumerate(block.reads):
        shape = [int(d) for d in region.source.shape]
        if region.source.scope() != "local" and shape == out_shape:
            sch.transform_layout(epilogue, ("read", i), blocked)
    loops = sch.get_loops(epilogue)
    if sch.get(loops[-1]).kind == tirx.ForKind.VECTORIZED:  # already on channel vectors
        return sch.mod["main"]
    at = [i for i, lp in enumerate(loops) if int(sch.get(lp).extent) % vector == 0]
    channel = next(i for i in at if i >= len(loops) - (3 if len(out_shape) == 4 else 2))
    f_o, f_v = sch.split(loops[channel], [None, vector])
    sch.reorder(f_o, *loops[channel + 1 :], f_v)
    sch.vectorize(f_v)
    return sch.mod["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("resnext", "mobilenet", "shufflenet"))
    parser.add_argument("--mcpu", default=None, help="llvm CPU (default: this machine's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from cpu_functions import _time_us, scheduled_module
    from kernel_timing import machine_line

    os.environ["GCONV_NCHWC"] = "0"  # the NCHW builds (compile's islands already block some)
    target, mod, details, calls, _ = scheduled_module(args.model, args.mcpu)
    print(machine_line())
    print(f"{args.model}, -mcpu={target.attrs['mcpu']}, {os.environ['TVM_NUM_THREADS']} threads")
    print(f"{'NCHW us':>8} {'NCHWc us':>8} {'ratio':>5} {'calls':>5}  function: schedule")
    totals = [0.0, 0.0]
    for gv, func in mod.functions_items():
        name = str(gv.name_hint)
        detail = details.get(name, "")
        if "channel form" not in detail:
            continue
        vector = int(detail.split("channel form: ")[1].split("-wide")[0])
        try:
            nchwc = _time_us(_blocked(func, vector), target)
        except Exception as err:  # noqa: BLE001 - report the function and go on
            why = (str(err).strip().splitlines() or [""])[-1][:80]
            print(f"{'':>8} {'':>8} {'':>5} {'':>5}  {name}: not re-laid out ({why})")
            continue
        count = len(calls.get(name, [])) or 1
        nchw = _time_us(func, target)
        totals[0] += nchw * count
        totals[1] += nchwc * count
        print(f"{nchw:8.1f} {nchwc:8.1f} {nchwc / nchw:5.2f} {count:5d}  {name}: {detail[:90]}")
    print(f"channel-form functions, times calls: NCHW {totals[0]:.0f} us, NCHWc outputs "
          f"{totals[1]:.0f} us ({totals[1] / max(totals[0], 1e-9):.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
