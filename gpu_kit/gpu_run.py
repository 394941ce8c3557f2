"""The GPU kit's runner: is every library correct, and how fast is it against cuDNN?

    python3 kit/gpu_run.py --out DIR [--rehearse] [--runs 50] [--warmup 10] [--only NAME ...]

(``run.sh`` calls it with the kit's runtime on the path.) For every model in ``manifest.json``:

1. Correctness: the library (sm_90, or its llvm twin with ``--rehearse``) against onnxruntime on
   the CPU on two seeded inputs. float32 uses the product's tolerances for the device
   (``gconv_compile.compare.TVM_TOLERANCES``). float16 is held to a float32 reference run on the
   same float16 values, with the rule of :func:`float16_tolerance`.
2. Timing: TVM, and torch's cuDNN on the same weights (``F.conv2d`` for a single conv; the whole
   ONNX graph op by op for a network, eager and captured in a CUDA graph); CUDA events, warm-up,
   median of ``--runs``. The rehearsal times TVM on the CPU and has no torch.
3. Bandwidth: a single conv's achieved GB/s (input + weights + output bytes over TVM's time)
   next to a device-to-device copy measured in the same run.

Writes ``DIR/gpu_results.json`` and ``DIR/gpu_results.md``, prints one line per model, exits 0
only when every correctness check passes (1 otherwise, 2 when something it needs is missing).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

KIT = Path(__file__).resolve().parents[1]


def need(module: str):
    """Import ``module`` or stop with one line: the kit installs nothing."""
    try:
        return __import__(module)
    except ImportError as exc:
        print(f"gpu_run: {module} is not installed here ({exc}); the kit needs it and installs "
              "nothing", file=sys.stderr)  # fmt: skip
        sys.exit(2)


np = need("numpy")
need("onnx")
need("onnxruntime")
need("tvm_ffi")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from kit_models import float16_tolerance, generate, to_float32  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from gconv_compile.compare import TVM_TOLERANCES, compare_results  # noqa: E402
from gconv_compile.errors import GconvError  # noqa: E402
from gconv_compile.runtime import cuda_code_sources, load  # noqa: E402

SEEDS = (0, 1)


class Timer:
    """CUDA events through torch on the GPU; wall clock and a device sync in the rehearsal."""

    def __init__(self, torch_ref, warmup: int, runs: int) -> None:
        self.torch_ref, self.warmup, self.runs = torch_ref, warmup, runs

    def median_ms(self, run, sync) -> float:
        if self.torch_ref is not None:
            return self.torch_ref.time_cuda(run, self.warmup, self.runs)
        for _ in range(self.warmup):
            run()
        sync()
        times = []
        for _ in range(self.runs):
            started = time.perf_counter()
            run()
            sync()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)


def host_copy_gbps(megabytes: int = 256, runs: int = 10) -> float:
    """Host memory copy bandwidth (bytes read + written per second), the rehearsal's yardstick."""
    src = np.random.default_rng(0).standard_normal(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - started)
    return 2 * src.nbytes / statistics.median(times) / 1e9


# ------------------------------------------------------------------------------- one model


def reference_model(row: dict, library: Path) -> onnx.ModelProto:
    """The ONNX model the library was built from. A generated one is made here from its seed,
    and, when the library was built with a weights file, its weights are written where the
    library's sidecar says ``load()`` reads them."""
    if "onnx" in row:
        return onnx.load(KIT / row["onnx"])
    model = generate(row["generate"], row["dtype"])
    entry = json.loads(Path(str(library) + ".json").read_text()).get("weights")
    if entry:  # else the weights are constants in the library
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        np.savez(library.parent / entry["file"], **{n: arrays[n] for n in entry["names"]})
    return model


def seeded_feeds(model: onnx.ModelProto, dtype: str, seed: int) -> dict:
    weights = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        if value.name in weights:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim
        ]
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def ort_outputs(model: onnx.ModelProto, feeds: dict) -> dict:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def check(row: dict, library, model: onnx.ModelProto, device: str) -> dict:
    """Library against onnxruntime on the CPU, on every seed; float16 against float32."""
    wide = to_float32(model) if row["dtype"] == "float16" else model
    references, candidates = [], []
    for seed in SEEDS:
        feeds = seeded_feeds(model, row["dtype"], seed)
        references.append(
            ort_outputs(
                wide,
                {
                    k: v.astype(np.float32) if row["dtype"] == "float16" else v
                    for k, v in feeds.items()
                },
            )
        )
        candidates.append(library.run(feeds))
    if row["dtype"] == "float16":
        return float16_check(row, references, candidates)
    stats = compare_results(
        references, candidates, tolerances=TVM_TOLERANCES[device], scale_atol=True
    )
    worst = max(stats, key=lambda s: s.max_abs_error)
    return {
        "passed": all(s.passed for s in stats),
        "max_abs_error": float(worst.max_abs_error),
        "tolerance": f"atol {worst.atol:.3g} + rtol {worst.rtol:.3g}|ref| (product, {device})",
    }


def float16_check(row: dict, references: list, candidates: list) -> dict:
    """float16 outputs against the float32 reference, with :func:`float16_tolerance` per output."""
    length, layers = row["reduction"]
    stats = []
    for ref, got in zip(references, candidates):
        for name, expected in ref.items():
            atol, rtol = float16_tolerance(expected, length, layers)
            wide = {name: got[name].astype(np.float32)} if name in got else {}
            stats += compare_results([{name: expected}], [wide], atol=atol, rtol=rtol)
    worst = max(stats, key=lambda s: s.max_abs_error)
    return {"passed": all(s.passed for s in stats), "max_abs_error": float(worst.max_abs_error),
            "tolerance": f"atol {worst.atol:.3g} + rtol {worst.rtol:.3g}|ref| "
            f"(float16 rule, K={length}, L={layers})"}  # fmt: skip


# ------------------------------------------------------------------------------- timing


def conv_bytes(row: dict) -> int:
    conv, size = row["conv"], 2 if row["dtype"] == "float16" else 4
    elements = sum(math.prod(conv[k]) for k in ("in_shape", "weight_shape", "out_shape"))
    return (elements + conv["out_shape"][1]) * size  # + bias


def time_tvm(library, model: onnx.ModelProto, dtype: str, timer: Timer) -> float:
    args = library.prepare(seeded_feeds(model, dtype, SEEDS[0]))
    return timer.median_ms(lambda: library.call(args), library.sync)


def time_torch(row: dict, model: onnx.ModelProto, torch_ref, timer: Timer) -> dict:
    """torch's milliseconds: F.conv2d for a conv, the graph eager and in a CUDA graph else."""
    torch = torch_ref.torch
    dtype = torch_ref.torch_dtype(row["dtype"])
    feeds = {k: torch.from_numpy(v).to("cuda", dtype)
             for k, v in seeded_feeds(model, row["dtype"], SEEDS[0]).items()}  # fmt: skip
    if row["kind"] == "conv":
        conv = row["conv"]
        w, b = (torch.from_numpy(numpy_helper.to_array(t).copy()).to("cuda", dtype)
                for t in model.graph.initializer)  # fmt: skip
        (x,) = feeds.values()
        run = lambda: torch_ref.F.conv2d(x, w, b, conv["stride"], conv["pad"], 1, conv["group"])  # noqa: E731
        return {"torch_ms": timer.median_ms(run, torch.cuda.synchronize),
                "torch_graph_ms": torch_ref.time_graph(run, timer.warmup, timer.runs)}  # fmt: skip
    missing = torch_ref.unsupported_ops(model)
    if missing:
        return {"torch_note": f"torch_reference does not run {missing}"}
    graph = torch_ref.TorchGraph(model, "cuda", dtype)
    run = lambda: graph(feeds)  # noqa: E731
    with torch.no_grad():
        return {"torch_ms": timer.median_ms(run, torch.cuda.synchronize),
                "torch_graph_ms": torch_ref.time_graph(run, timer.warmup, timer.runs)}  # fmt: skip


def run_model(row: dict, args, torch_ref, timer: Timer, copy_gbps: float) -> dict:
    target = "llvm" if args.rehearse else "cuda"
    library_path = KIT / row["libraries"][target]
    result = {"name": row["name"], "dtype": row["dtype"], "library": row["libraries"][target],
              "passed": False, "max_abs_error": None, "tvm_ms": None, "torch_ms": None,
              "torch_graph_ms": None, "gbps": None}  # fmt: skip
    if not args.rehearse and row.get("cuda_build_error"):
        result["error"] = f"the kit's build could not compile it: {row['cuda_build_error']}"
        return result
    try:
        model = reference_model(row, library_path)
        before = dict(cuda_code_sources)
        library = load(library_path)
        result.update(check(row, library, model, "cpu" if args.rehearse else "cuda"))
        # An embedded fatbin goes to the driver as it is; TVM asks for machine code (answered
        # from a prebuilt file or by nvcc there) only for a library that holds CUDA C.
        asked = {k: cuda_code_sources[k] - before[k] for k in before}
        embedded = bool((library.info.get("cuda_binary") or {}).get("embedded"))
        result["cuda_code"] = {"embedded": embedded, **asked}
        result["tvm_ms"] = time_tvm(library, model, row["dtype"], timer)
    except GconvError as error:
        result["error"] = str(error)
        return result
    except Exception as exc:  # noqa: BLE001 - one model's crash must not lose the others
        result["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        return result
    if row["kind"] == "conv":
        result["gbps"] = conv_bytes(row) / (result["tvm_ms"] * 1e-3) / 1e9
        result["copy_fraction"] = result["gbps"] / copy_gbps
    if torch_ref is not None:
        try:  # a torch failure costs the comparison, not the correctness verdict
            result.update(time_torch(row, model, torch_ref, timer))
        except Exception as exc:  # noqa: BLE001 - reported in the row, the run goes on
            result["torch_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return result


# ------------------------------------------------------------------------------- report


def line(result: dict) -> str:
    def ms(key: str) -> str:
        return f"{result[key]:.3f} ms" if result.get(key) is not None else "-"

    head = "PASS" if result["passed"] else "FAIL"
    text = f"{head} {result['name']:<24} {result['dtype']:<8}"
    if "error" in result:
        return f"{text} error: {result['error']}"
    text += (f" max|err| {result['max_abs_error']:.3g}  tvm {ms('tvm_ms')}  torch {ms('torch_ms')}"
             f"  torch graph {ms('torch_graph_ms')}")  # fmt: skip
    if result.get("gbps") is not None:
        text += f"  {result['gbps']:.1f} GB/s ({100 * result['copy_fraction']:.0f}% of copy)"
    return text


def markdown(report: dict) -> str:
    rows = [
        f"# GPU kit results ({report['mode']})", "",
        f"Device: {report['device']}; {report['date']}; runs: median of {report['runs']} after "
        f"{report['warmup']} warm-up; copy bandwidth {report['copy_gbps']:.1f} GB/s.", "",
        "| model | dtype | passed | max abs error | TVM ms | torch ms | torch graph ms | GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in report["models"]:
        cells = [r["name"], r["dtype"], "yes" if r["passed"] else "**no**"]
        for key, form in (("max_abs_error", "{:.3g}"), ("tvm_ms", "{:.3f}"),
                          ("torch_ms", "{:.3f}"), ("torch_graph_ms", "{:.3f}"), ("gbps", "{:.1f}")):  # fmt: skip
            cells.append(form.format(r[key]) if r.get(key) is not None else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_results(report: dict, out: Path) -> None:
    (out / "gpu_results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_results.md").write_text(markdown(report))


def device_name(torch_ref) -> str:
    if torch_ref is not None:
        return torch_ref.torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as handle:
            names = [ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")]
        return f"{names[0]} ({len(names)} CPUs), rehearsal" if names else platform.machine()
    except OSError:
        return platform.machine()


def start_torch(rehearse: bool):
    """torch_reference on a visible GPU, TF32 off (TVM's float32 is true float32); None to rehearse."""
    if rehearse:
        return None
    need("torch")
    torch_ref = importlib.import_module("torch_reference")
    if not torch_ref.torch.cuda.is_available():
        print("gpu_run: torch sees no CUDA GPU; run on the GPU machine, or pass --rehearse",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    torch_ref.torch.backends.cudnn.allow_tf32 = False
    torch_ref.torch.backends.cuda.matmul.allow_tf32 = False
    return torch_ref


class OneLineParser(argparse.ArgumentParser):
    """Bad options are one line on stderr and exit 2, not a usage block."""

    def error(self, message: str):
        print(f"gpu_run: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rehearse", action="store_true", help="llvm twins on this CPU, no torch")
    parser.add_argument("--runs", type=int, help="timed runs (default 50; 5 to rehearse)")
    parser.add_argument("--warmup", type=int, help="warm-up runs (default 10; 1 to rehearse)")
    parser.add_argument("--only", nargs="+", help="model names to run")
    args = parser.parse_args(argv)
    runs = args.runs or (5 if args.rehearse else 50)
    warmup = args.warmup if args.warmup is not None else (1 if args.rehearse else 10)
    torch_ref = start_torch(args.rehearse)
    manifest = json.loads((KIT / "manifest.json").read_text())
    rows = [r for r in manifest["models"] if not args.only or r["name"] in args.only]
    if not rows:
        print(f"gpu_run: no model named {args.only} in the kit", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(torch_ref, warmup, runs)
    copy = torch_ref.copy_gbps(1024, warmup, runs) if torch_ref else host_copy_gbps()
    report = {"mode": "rehearse" if args.rehearse else "gpu", "device": device_name(torch_ref),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "runs": runs, "warmup": warmup,
              "copy_gbps": copy, "arch": manifest["arch"], "torch_tf32": False, "models": []}  # fmt: skip
    print(f"gpu_run {report['mode']}: {report['device']}; copy {copy:.1f} GB/s", flush=True)
    started = time.perf_counter()
    for row in rows:
        result = run_model(row, args, torch_ref, timer, copy)
        result["elapsed_s"] = round(time.perf_counter() - started, 1)
        report["models"].append(result)
        print(line(result), flush=True)
        write_results(report, args.out)  # a run stopped by the time limit keeps what it did
    report["cuda_build_errors"] = {f"{r['name']}.{r['dtype']}": r["cuda_build_error"]
                                   for r in rows if r.get("cuda_build_error")}  # fmt: skip
    if args.rehearse and report["cuda_build_errors"]:
        print(f"gpu_run: note: the kit's build could not compile {len(report['cuda_build_errors'])}"
              f" CUDA librar(y/ies), which fail on the GPU: {', '.join(report['cuda_build_errors'])}")  # fmt: skip
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_results(report, args.out)
    failed = [f"{r['name']}.{r['dtype']}" for r in report["models"] if not r["passed"]]
    print(f"gpu_run: {len(rows) - len(failed)}/{len(rows)} correct"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; wrote {args.out}/gpu_results.json")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
