"""How many MetaSchedule trials fit in a night for ResNeXt-50 on this machine: measured, then scaled.

Run: ``python benchmarks/tuning_budget.py [--trials 16] [--hours 10]``

It extracts ResNeXt-50 32x4d's tuning tasks (the functions ``gconv-compile compile --tune-trials``
would tune), tunes one of them (the stage-3 grouped 3x3 conv with its bias and Relu, a mid-sized
task, built alone as a one-conv model) with ``--trials`` measurements into a temporary database, and times it all: MetaSchedule's search, the candidate
builds, the runs, and our default-vs-tuned check (``tune`` times both schedules of every tuned
task). From the seconds per trial it prints the budget that fills ``--hours`` and the trials per
task that gives.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from kernel_timing import machine_line  # noqa: E402
from resnext_model import build_resnext50, single_conv_model, stage_convs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials spent on the sample task")
    parser.add_argument("--hours", type=float, default=10.0, help="the night")
    parser.add_argument("--conv", default="s3_gconv_s1", help="sample: a stage conv's name")
    args = parser.parse_args(argv)
    import tvm
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.s_tir import meta_schedule as ms

    from gconv_compile import tvm_schedules

    target = tvm.target.Target(tvm_schedules.host_target())
    with target:
        mod = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(
            from_onnx(build_resnext50("grouped"), keep_params_in_input=False)
        )
    tasks = ms.relax_integration.extract_tasks(mod, target)
    (shape,) = [s for s in stage_convs() if s.name == args.conv]
    with target:
        sample = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(
            from_onnx(single_conv_model(shape), keep_params_in_input=False)
        )
    with tempfile.TemporaryDirectory(prefix="gconv-tune-budget-") as db:
        started = time.perf_counter()
        summary = tvm_schedules.tune(sample, target, trials=args.trials, db_dir=db)
        seconds = time.perf_counter() - started
        verdicts = list(tvm_schedules.tuning.read_verdicts(db).values())
    if not summary.trials:
        raise SystemExit(f"nothing was measured: {summary.line()}")
    per_trial = seconds / max(summary.trials, 1)
    budget = int(args.hours * 3600 / per_trial)
    print(machine_line())
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}; target {target}; {os.cpu_count()} cores")
    print(f"ResNeXt-50 32x4d: {len(tasks)} tuning tasks")
    print(f"sample task {args.conv} ({summary.tuned}): {summary.trials} trials in {seconds:.0f} s "
          f"({per_trial:.1f} s per trial, search, builds, runs and the default-vs-tuned check)")  # fmt: skip
    for v in verdicts:
        print(f"default schedule {v['default_us']} us, best of {summary.trials} trials "
              f"{v['tuned_us']} us: the build keeps the {v['keep']} one")  # fmt: skip
    print(f"{args.hours:g} h -> --tune-trials {budget} ({budget // len(tasks)} per task)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
