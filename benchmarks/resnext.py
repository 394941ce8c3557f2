"""ResNeXt-50 32x4d on onnxruntime (CPU) and on TVM llvm with gconv_compile's schedules.

Run: ``python benchmarks/resnext.py [--repeat 20] [--threads 2] [--tune-trials N --tune-db DIR]``

Rows (batch 1, 224x224, float32, BN folded, seeded random weights):

- ``grouped``: the native model (one ``Conv(group=32)`` per bottleneck);
- ``branchy``: each grouped conv written as ``Split -> 32 Conv -> Concat``. onnxruntime runs it as
  it is; TVM compiles it after ``FoldSplitConvConcat`` (the passes ``optimize`` runs);
- one row per distinct grouped 3x3 conv of the network (conv + bias + Relu, as fused in the model).

Each TVM row also checks the output against onnxruntime (max |diff| / max |ref|). Timings are the
median of ``--repeat`` runs after warm-up, in milliseconds, with ``--threads`` threads for both
runtimes (TVM_NUM_THREADS is set before TVM starts its pool). The two runtimes are timed
alternately, run by run, so both see the same machine load; the load average
(``os.getloadavg``) is printed with the table, since other processes on a shared machine inflate
every number. A last row compares TVM on the folded branchy model with TVM on the native model
(target: at most 1.02x).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnext_model import build_resnext50, single_conv_model, stage_convs  # noqa: E402

from gconv_compile.files import write_text_atomic  # noqa: E402


def median_ms(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def paired_ms(first, second, repeat: int, rounds: int = 5) -> tuple[float, float]:
    """Median ms of two functions timed in alternating blocks, so both see the same load.

    Blocks (not single runs) because each runtime's thread pool spins for a while after a run
    and would steal the cores from the other one.
    """
    a: list[float] = []
    b: list[float] = []
    per_round = max(1, repeat // rounds)
    for _ in range(rounds):
        for fn, out in ((first, a), (second, b)):
            for _ in range(2):  # warm-up, and let the other pool go idle
                fn()
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def ort_runner(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def tvm_runner(model, target, *, db_dir: str | None = None, stock: bool = False):
    """Compile ``model`` with our pipeline (or TVM's stock default pipeline) and return a runner."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from gconv_compile import tvm_schedules

    mod = from_onnx(model)
    decisions: list = []
    pipeline = (
        "default"
        if stock
        else tvm_schedules.relax_pipeline(target, db_dir=db_dir, decisions=decisions)
    )
    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(mod, target, relax_pipeline=pipeline)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    fn = vm["main"]

    views: dict[int, tuple] = {}

    def run(x):
        # Like onnxruntime, read the caller's input in place and hand the output back without a
        # copy: DLPack needs 64-byte alignment, so an aligned copy is made once per input array,
        # outside the timed region's steady state.
        view = views.get(id(x))
        if view is None or view[0] is not x:
            aligned = _aligned_copy(x)
            view = views[id(x)] = (x, aligned, tvm.runtime.from_dlpack(aligned))
        return np.from_dlpack(fn(view[2]))

    return run, decisions


def _aligned_copy(x: np.ndarray, alignment: int = 64) -> np.ndarray:
    raw = np.empty(x.nbytes + alignment, dtype=np.uint8)
    offset = -raw.ctypes.data % alignment
    aligned = raw[offset : offset + x.nbytes].view(x.dtype).reshape(x.shape)
    aligned[...] = x
    return aligned


def fold(model):
    import onnx_ir as ir

    from gconv_compile.targets import passes_for_target

    ir_model = ir.serde.deserialize_model(model)
    rewrites, _ = passes_for_target("optimize")(ir_model)
    return ir.serde.serialize_model(ir_model), len(rewrites)


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--tune-trials", type=int, default=0, help="also compile with MetaSchedule tuning"
    )
    parser.add_argument("--tune-db", default=None, help="tuning database dir (reused if present)")
    parser.add_argument("--skip-model", action="store_true", help="only the stage convs")
    parser.add_argument("--skip-convs", action="store_true", help="only the whole models")
    parser.add_argument(
        "--stock", action="store_true", help="also time TVM's stock pipeline on the convs"
    )
    parser.add_argument(
        "--markdown", type=Path, help="write the table (with machine and command) here"
    )
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import tvm

    from gconv_compile import tvm_schedules

    target = tvm.target.Target(tvm_schedules.host_target(args.threads))
    rows: list[tuple[str, str, str, str, str, str]] = []

    def add(
        name: str, ort_ms: float, tvm_ms: float | None, err: float | None, note: str = ""
    ) -> None:
        tvm_s = f"{tvm_ms:.2f}" if tvm_ms is not None else "-"
        ratio = f"{tvm_ms / ort_ms:.2f}x" if tvm_ms is not None else "-"
        err_s = f"{err:.1e}" if err is not None else "-"
        rows.append((name, f"{ort_ms:.2f}", tvm_s, ratio, err_s, note))
        print(
            f"{name:34s} ort {ort_ms:8.2f} ms  tvm {tvm_s:>8s} ms  {ratio:>7s}  err {err_s}  {note}",
            flush=True,
        )

    if not args.skip_model:
        _time_models(args, target, add, rows)
    if not args.skip_convs:
        _time_stage_convs(args, target, add)
    _print_table(args, target, rows, argv)
    return 0


def _time_models(args, target, add, rows) -> None:
    """The whole ResNeXt-50: grouped (default and tuned) and branchy folded."""
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    grouped = build_resnext50("grouped")
    ort_run = ort_runner(grouped, args.threads)
    ref = ort_run(x)
    run, decisions = tvm_runner(grouped, target)
    convs = sum(d.schedule.startswith("cpu-") and d.schedule.endswith("-conv") for d in decisions)
    ort_ms, tvm_ms = paired_ms(lambda: ort_run(x), lambda: run(x), args.repeat)
    add("ResNeXt-50 grouped, default", ort_ms, tvm_ms, rel_err(run(x), ref),
        f"{convs} conv functions scheduled")  # fmt: skip
    if args.tune_trials or args.tune_db:
        db = args.tune_db or "tune_db"
        if args.tune_trials:
            _tune(grouped, target, args.tune_trials, db)
        run_t, _ = tvm_runner(grouped, target, db_dir=db)
        ort_ms, tuned_ms = paired_ms(lambda: ort_run(x), lambda: run_t(x), args.repeat)
        add("ResNeXt-50 grouped, tuned", ort_ms, tuned_ms, rel_err(run_t(x), ref),
            f"{args.tune_trials} trials, db {db}")  # fmt: skip
    branchy = build_resnext50("branchy")
    ort_b = ort_runner(branchy, args.threads)
    folded, n_folds = fold(branchy)
    run_f, _ = tvm_runner(folded, target)
    ort_b_ms, folded_ms = paired_ms(lambda: ort_b(x), lambda: run_f(x), args.repeat)
    add("ResNeXt-50 branchy, folded", ort_b_ms, folded_ms, rel_err(run_f(x), ref),
        f"ort runs the branchy model; TVM the folded one ({n_folds} folds)")  # fmt: skip
    native_ms, folded_ms = paired_ms(lambda: run(x), lambda: run_f(x), args.repeat)
    rows.append(("TVM folded branchy vs TVM native", f"{native_ms:.2f}", f"{folded_ms:.2f}",
                 f"{folded_ms / native_ms:.2f}x", "-", "first column: TVM on the native model"))  # fmt: skip
    print(
        f"TVM folded / native: {folded_ms:.2f} / {native_ms:.2f} ms = {folded_ms / native_ms:.2f}x"
    )


def _time_stage_convs(args, target, add) -> None:
    """Each stage's grouped conv alone (and TVM's stock pipeline with --stock)."""
    for shape in stage_convs():
        model = single_conv_model(shape)
        xc = np.random.default_rng(1).standard_normal(
            (1, shape.in_channels, shape.size, shape.size)
        )
        xc = xc.astype(np.float32)
        ort_c = ort_runner(model, args.threads)
        ref_c = ort_c(xc)
        run_c, decisions = tvm_runner(model, target)
        ort_ms, tvm_ms = paired_ms(lambda: ort_c(xc), lambda: run_c(xc), args.repeat * 5)  # noqa: B023
        note = (
            f"{shape.macs / 1e6:.1f} MMAC; {decisions[0].detail.split(': ', 1)[-1]}"
            if decisions
            else ""
        )
        add(
            f"{shape.name} {shape.in_channels}ch {shape.size}px",
            ort_ms,
            tvm_ms,
            rel_err(run_c(xc), ref_c),
            note,
        )
        if args.stock:
            run_s, _ = tvm_runner(model, target, stock=True)
            add(f"{shape.name} (TVM stock pipeline)", ort_ms, median_ms(lambda: run_s(xc), 3, 1),  # noqa: B023
                rel_err(run_s(xc), ref_c))  # fmt: skip


def _print_table(args, target, rows, argv) -> None:
    """The table with the machine, date and command that made it (and --markdown's file)."""
    load = os.getloadavg()
    header = (
        f"Machine: {platform.processor() or platform.machine()}, {_cpu_name()}, {os.cpu_count()} cores; "
        f"threads {args.threads}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
        f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}; target {target}\n"
        f"Command: python benchmarks/resnext.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    table = [
        "| case | onnxruntime ms | TVM ms | TVM / ort | rel. error | notes |",
        "|---|---|---|---|---|---|",
    ]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    print()
    print(header)
    print("\n".join(table))
    if args.markdown:
        _write_markdown(
            args.markdown, header.replace("\n", "  \n") + "\n\n" + "\n".join(table) + "\n"
        )


START, END = "<!-- resnext-table:start -->", "<!-- resnext-table:end -->"


def _write_markdown(path: Path, block: str) -> None:
    """Replace the text between the table markers of ``path`` (or write the block alone)."""
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{START}\n{block}{END}{tail}"
    else:
        text = f"{START}\n{block}{END}\n"
    write_text_atomic(path, text)


def _tune(model, target, trials: int, db: str) -> None:
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from gconv_compile import tvm_schedules

    mod = from_onnx(model)
    with target:
        mod = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(mod)
    tvm_schedules.tune(mod, target, trials=trials, db_dir=db, progress=_print_progress)


def _print_progress(done: int, total: int, eta_s: float | None) -> None:
    eta = f", ETA {eta_s:.0f} s" if eta_s is not None else ""
    print(f"\rtuning: {done}/{total} trials{eta}", end="", file=sys.stderr, flush=True)
    if done >= total:
        print(file=sys.stderr)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
