"""Compile the onnx wheel's light zoo models with TVM and verify them against onnxruntime.

The models (ShuffleNet v1, AlexNet, SqueezeNet, Inception v1) ship with ConstantOfShape(0.02)
placeholder weights; ``tests/grouped_models.zoo_model`` replaces them with seeded random
initializers. For each model this builds an llvm library, verifies it from a fresh load against
onnxruntime (CPU EP) on seeded random inputs, and builds a CUDA library (no GPU needed).

Run::

    .venv/bin/python benchmarks/zoo_compile.py [--seeds 3] [--models light_shufflenet ...]

and it prints one row per model: the build, export, load and run times and the worst error.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from grouped_models import zoo_model  # noqa: E402

from gconv_compile.build import compile  # noqa: E402
from gconv_compile.library import load_library  # noqa: E402
from gconv_compile.verify import verify  # noqa: E402

MODELS = ("light_shufflenet", "light_bvlc_alexnet", "light_squeezenet", "light_inception_v1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed runs for the median")
    args = parser.parse_args(argv)

    print(f"# {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    header = (
        "model", "nodes", "llvm build s", "export s", "run ms (median)", "verify",
        "max abs err", "cuda build s", "cuda .cu kB",
    )  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gconv-zoo-") as tmp:
        for name in args.models:
            model = zoo_model(name)
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(model, path)
            built = compile(path, "llvm", output=Path(tmp) / f"{name}.so", check=False)
            result = verify(path, library=Path(tmp) / f"{name}.so", seeds=range(args.seeds))
            runner = load_library(Path(tmp) / f"{name}.so")
            feeds = {
                spec.name: np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
                for spec in runner.info.inputs
            }
            runner.run(feeds)
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                runner.run(feeds)
                times.append(time.perf_counter() - started)
            cuda = compile(
                path, "cuda", output=Path(tmp) / f"{name}_cuda.so", check=False,
                emit_source=Path(tmp) / "src",
            )  # fmt: skip
            cu_kb = sum(p.stat().st_size for p in cuda.sources) / 1024
            worst = max(s.max_abs_error for s in result.check.outputs)
            failed += not result.passed
            row = (
                name, str(len(model.graph.node)), f"{built.timings['build_s']:.1f}",
                f"{built.timings['export_s']:.1f}", f"{statistics.median(times) * 1e3:.0f}",
                "pass" if result.passed else "FAIL", f"{worst:.2g}",
                f"{cuda.timings['build_s']:.1f}", f"{cu_kb:.0f}",
            )  # fmt: skip
            print("| " + " | ".join(row) + " |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
