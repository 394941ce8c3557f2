"""GPU check: build the example and a ResNeXt-like model for CUDA, run and verify them on a GPU.

For each model: ``gconv-compile compile --target cuda`` (fold, TVM Relax build, export), load
the library (TVM compiles its CUDA C here, with NVRTC or nvcc), verify it against onnxruntime's
CUDA execution provider (TF32 off) on seeded random inputs, and time both (median of N runs
after warm-up, inputs already on the GPU, synchronised after each run).

    .venv/bin/python benchmarks/gpu_check.py [--runs 50] [--size 224] [--batch 1]

Without a GPU it says so and exits 2 without checking anything. ``--target llvm`` runs the same
steps on the CPU (CPU EP reference), to try the script on a machine without a GPU.

What the GPU machine needs, besides the driver: apache-tvm (as pinned in pyproject.toml), the
CUDA toolkit headers (CUDA_PATH or nvcc on PATH), and NVRTC (``pip install cuda-bindings
nvidia-cuda-nvrtc``) or nvcc (used automatically when cuda-bindings is missing); for the
reference, onnxruntime-gpu with its CUDA and cuDNN libraries.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "01_chunked_conv"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from gconv_compile.compile import (  # noqa: E402
    compile,
    cuda_available,
    load_library,
    tvm_version,
)
from gconv_compile.errors import GconvError  # noqa: E402
from gconv_compile.tvm_verify import verify  # noqa: E402


def gpu_name() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 else "unknown GPU"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown GPU"


def ort_median_ms(path: Path, feeds: dict, on_gpu: bool, warmup: int, runs: int) -> float | None:
    """onnxruntime with its default graph optimisations (what a deployment would use)."""
    import onnxruntime as ort

    providers = (
        [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
        if on_gpu else ["CPUExecutionProvider"]
    )  # fmt: skip
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=providers)
    if on_gpu and session.get_providers()[0] != "CUDAExecutionProvider":
        return None
    # IO binding keeps inputs and outputs on the device, like the TVM timing.
    binding = session.io_binding()
    device = "cuda" if on_gpu else "cpu"
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device)
    for _ in range(warmup):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def check_model(name: str, model: onnx.ModelProto, target: str, args, folder: Path) -> bool:
    path = folder / f"{name}.onnx"
    onnx.save(model, path)
    library = folder / f"{name}_{target}.so"
    print(f"\n== {name} ({len(model.graph.node)} nodes) ==", flush=True)
    compiled = compile(path, target, output=library, check=False)
    t = compiled.timings
    print(
        f"compile   {len(compiled.report.rewrites)} blocks folded; build {t['build_s']:.1f} s, "
        f"export {t['export_s']:.1f} s",
        flush=True,
    )
    started = time.perf_counter()
    runner = load_library(library)
    rng = np.random.default_rng(0)
    feeds = {
        spec.name: rng.standard_normal(
            [d if isinstance(d, int) else args.batch for d in spec.shape]
        ).astype(spec.dtype)
        for spec in runner.info.inputs
    }
    runner.run(feeds)  # the first run loads the CUDA module (NVRTC/nvcc compile)
    what = "load + CUDA C compile + first run" if target == "cuda" else "load + first run"
    print(f"load      {time.perf_counter() - started:.1f} s ({what})")
    result = verify(path, library=library, seeds=range(args.seeds))
    for line in result.lines():
        print(line)
    tvm_ms = statistics.median(runner.time_runs(feeds, warmup=args.warmup, runs=args.runs)) * 1e3
    ort_ms = ort_median_ms(path, feeds, target == "cuda", args.warmup, args.runs)
    shape = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    ort_text = f"{ort_ms:.2f} ms" if ort_ms is not None else "n/a (CUDA EP unavailable)"
    print(
        f"timing    {shape}: TVM {tvm_ms:.2f} ms, onnxruntime {ort_text} "
        f"(median of {args.runs} after {args.warmup} warm-up)"
    )
    return result.passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("cuda", "llvm"), default="cuda")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="for symbolic batch dims")
    parser.add_argument("--size", type=int, default=224, help="ResNeXt input size")
    parser.add_argument(
        "--models", nargs="+", default=["example", "resnext50-branchy"],
        choices=["example", "resnext50-branchy"],
    )  # fmt: skip
    args = parser.parse_args(argv)

    if args.target == "cuda" and not cuda_available():
        print(
            "gpu_check: no CUDA GPU is visible to TVM (tvm.cuda(0).exist is False), so nothing "
            "was checked. Run it on a machine with an NVIDIA GPU and driver, or pass "
            "--target llvm to try the steps on the CPU.",
            file=sys.stderr,
        )
        return 2
    device = gpu_name() if args.target == "cuda" else platform.processor() or platform.machine()
    print(
        f"gpu_check {datetime.date.today().isoformat()}: {device}; TVM {tvm_version()}; "
        f"target {args.target}"
    )

    from model import build_model
    from resnext_model import build_resnext50

    builders = {
        "example": lambda: build_model(),
        "resnext50-branchy": lambda: build_resnext50("branchy", batch=args.batch, size=args.size),
    }
    failed = []
    with tempfile.TemporaryDirectory(prefix="gconv-gpu-check-") as tmp:
        for name in args.models:
            try:
                if not check_model(name, builders[name](), args.target, args, Path(tmp)):
                    failed.append(name)
            except GconvError as error:
                print(f"{name}: error: {error}", file=sys.stderr)
                failed.append(name)
    print(f"\ngpu_check: {'FAIL: ' + ', '.join(failed) if failed else 'all models match'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
