"""Where a model's time goes in TVM on this CPU: every function of the build, timed alone.

Run: ``python benchmarks/cpu_functions.py resnext|mobilenet|shufflenet [--mcpu haswell]
[--only conv2d] [--threads 2]``

The model goes through the same pipeline as ``compile`` (legalise, fuse, our schedules); each
PrimFunc is then built on its own and timed with TVM's ``time_evaluator`` (min of 40 runs) on
seeded random arguments, and multiplied by how many times the model calls it. The table lists
the functions by total time with the schedule each got; the sum approximates a model run
(without the VM's own overhead). Relative numbers are what it is for: a busy machine inflates
them all.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]


def _model(name: str):
    if name == "shufflenet":
        from grouped_models import zoo_model

        return zoo_model("light_shufflenet")
    if name == "mobilenet":
        from mobilenet_model import build_mobilenet_v2

        return build_mobilenet_v2()
    from resnext_model import build_resnext50

    return build_resnext50("grouped")


def scheduled_module(model, mcpu: str | None):
    """``model`` (a name above or an ``onnx.ModelProto``) through ``compile``'s pipeline up to
    our schedules: (target, module, each function's schedule detail, its call sites, the module
    as fused, before our schedules)."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from gconv_compile import tvm_schedules
    from gconv_compile.targets import host_llvm_target
    from gconv_compile.tvm_schedules import _call_sites

    target = tvm.target.Target(host_llvm_target(mcpu))
    mod = from_onnx(_model(model) if isinstance(model, str) else model, keep_params_in_input=False)
    with target:
        fused = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(mod)
        mod, decisions = tvm_schedules.schedule_module(fused, target)
    return target, mod, {d.function: d.detail for d in decisions}, _call_sites(mod), fused


def _time_us(func, target) -> float:
    import numpy as np
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    device, rng = tvm.cpu(), np.random.default_rng(0)
    args = [
        tvm.runtime.tensor(rng.standard_normal(info.shape).astype(info.dtype), device)
        for info in ArgInfo.from_prim_func(func)
    ]
    evaluator = lib.jit().time_evaluator("main", device, number=1, repeat=40)
    return float(evaluator(*args).min) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("resnext", "mobilenet", "shufflenet"))
    parser.add_argument("--mcpu", default=None, help="llvm CPU (default: this machine's)")
    parser.add_argument("--only", default="", help="only functions whose name contains this")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from kernel_timing import machine_line
    from tvm import tirx

    target, mod, details, calls, _ = scheduled_module(args.model, args.mcpu)
    rows = []
    for gv, func in mod.functions_items():
        name = str(gv.name_hint)
        if isinstance(func, tirx.PrimFunc) and args.only in name:
            once = _time_us(func, target)
            count = len(calls.get(name, [])) or 1
            rows.append((once * count, once, count, name, details.get(name, "")))
    rows.sort(reverse=True)
    print(machine_line())
    print(f"{args.model}, -mcpu={target.attrs['mcpu']}, {args.threads} threads: "
          f"sum {sum(r[0] for r in rows) / 1e3:.2f} ms")  # fmt: skip
    print(f"{'total us':>9} {'once us':>8} {'calls':>5}  function: schedule")
    for total, once, count, name, detail in rows[: args.top]:
        print(f"{total:9.1f} {once:8.1f} {count:5d}  {name}: {detail[:140]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
