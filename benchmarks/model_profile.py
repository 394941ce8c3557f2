"""Where a whole model run's time goes in TVM: every call of the built library, timed in place.

Run: ``python benchmarks/model_profile.py resnext|mobilenet|shufflenet [--mcpu haswell]
[--runs 10] [--top 30]``

The model is compiled as ``compile`` does (``gconv_compile.compile``) and run through the
product's loader; the whole run is timed (min of ``--runs`` blocks of 5), then the Relax VM's
instrument hook times every call it makes (kernels and VM builtins such as ``alloc_tensor``)
inside real runs, so caches hold what the model leaves in them (unlike
``cpu_functions.py``, which times each function alone on warm caches). Per function: the
minimum over the runs of its summed time per run. The hook adds about 1 us per call of its
own (Python), so the call sum slightly exceeds the whole-run time; what the sum and the whole
run show together is how much of a run is not spent inside calls at all (the VM's own
dispatch). ``--ort`` adds onnxruntime's node times from its own profiler, same input.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]


def _profile(library, args, runs: int) -> dict[str, tuple[float, int]]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library.path)), tvm.cpu())
    calls: dict[str, list[int]] = {}
    started = {}

    def instrument(func, symbol, before, ret, *rest):
        now = time.perf_counter_ns()
        if before:
            started["t"] = now
        else:
            calls.setdefault(symbol, []).append(now - started["t"])
        return 0

    vm.set_instrument(instrument)
    best: dict[str, tuple[float, int]] = collections.defaultdict(lambda: (float("inf"), 0))
    for _ in range(runs):
        calls.clear()
        vm["main"](*args)
        for name, times in calls.items():
            best[name] = (min(best[name][0], sum(times) / 1e3), len(times))
    return dict(best)


def _ort_profile(model, x: np.ndarray, runs: int, top: int) -> None:
    """onnxruntime's own profiler (CPU EP, all graph optimisations, every usable core): each
    node's kernel time, min over the runs, for the same comparison in place."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.enable_profiling = True
    session = ort.InferenceSession(model.SerializeToString(), options)
    feeds = {session.get_inputs()[0].name: x}
    for _ in range(runs + 2):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    nodes: dict[str, list[float]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "")
            nodes[f"{event['name'][: -len('_kernel_time')]} ({op})"].append(event["dur"])
    best = {name: min(times[-runs:]) for name, times in nodes.items()}
    print(f"onnxruntime: node kernels {sum(best.values()) / 1e3:.3f} ms in {len(best)} nodes")
    for name, us in sorted(best.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{us:9.1f}        {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("resnext", "mobilenet", "shufflenet"))
    parser.add_argument("--mcpu", default=None, help="llvm CPU (default: this machine's)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--ort", action="store_true", help="also onnxruntime's node times")
    args = parser.parse_args(argv)
    from cpu_functions import _model
    from kernel_timing import machine_line

    import gconv_compile

    model = _model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "model.so"
        gconv_compile.compile(model, "llvm", mcpu=args.mcpu, output=out, check=False)
        library = gconv_compile.load(out)
        dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(1).standard_normal(dims).astype(np.float32)
        prepared = library.prepare({library.input_names[0]: x})
        whole = []
        for _ in range(args.runs):
            for _ in range(5):
                start = time.perf_counter()
                library.call(prepared)
                whole.append(time.perf_counter() - start)
        best = _profile(library, [*prepared, *library._weights], args.runs)
    kernels = {k: v for k, v in best.items() if not k.startswith("vm.builtin")}
    builtins = {k: v for k, v in best.items() if k.startswith("vm.builtin")}
    print(machine_line())
    print(f"{args.model}, -mcpu={library.info['target'].get('mcpu')}, {library.threads} threads")
    print(f"whole run: min {min(whole) * 1e3:.3f} ms, median {np.median(whole) * 1e3:.3f} ms")
    print(f"kernels: {sum(t for t, _ in kernels.values()) / 1e3:.3f} ms in "
          f"{sum(n for _, n in kernels.values())} calls; VM builtins: "
          f"{sum(t for t, _ in builtins.values()) / 1e3:.3f} ms in "
          f"{sum(n for _, n in builtins.values())} calls")  # fmt: skip
    print(f"{'total us':>9} {'calls':>5}  function")
    for name, (total, count) in sorted(best.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{total:9.1f} {count:5d}  {name}")
    if args.ort:
        _ort_profile(model, x, args.runs, args.top)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    raise SystemExit(main())
