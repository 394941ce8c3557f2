"""`make demo`, second half: compile the example with TVM, verify it, build for CUDA.

Usage: ``python compile_demo.py [MODEL.onnx [OUT_DIR]]`` (default: build the example model into
``examples/01_chunked_conv/out/``). Runs, as a user would:

1. ``gconv-compile compile`` for this CPU (llvm): fold, import into TVM Relax, build, export;
2. ``gconv-compile verify`` of that library against onnxruntime on the original model;
3. ``gconv-compile compile --target cuda``: on a machine with a GPU, then verify on it; without
   one, show that the CUDA build succeeds (library and CUDA C written; no GPU needed to build).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def run(*args: str) -> None:
    print(f"\n$ gconv-compile {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "gconv_compile", *args])
    if done.returncode != 0:
        sys.exit(done.returncode)


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else HERE / "out"
    out.mkdir(exist_ok=True)
    if argv and argv[0]:
        model = Path(argv[0])
    else:
        import onnx

        sys.path.insert(0, str(HERE))
        from model import build_model

        model = out / "chunked_resnext.onnx"
        onnx.save(build_model(), model)

    cpu_lib = out / "chunked_resnext_llvm.so"
    run("compile", rel(model), "-o", rel(cpu_lib), "--target", "llvm",
        "--report", rel(out / "compile_llvm.json"))  # fmt: skip
    run("verify", rel(model), "--lib", rel(cpu_lib), "--report", rel(out / "verify_llvm.json"))

    sys.path.insert(0, str(HERE.parents[1]))
    from gconv_compile.targets import cuda_available

    gpu_lib = out / "chunked_resnext_cuda.so"
    source_dir = out / "cuda_src"
    run("compile", rel(model), "-o", rel(gpu_lib), "--target", "cuda", "--no-check",
        "--emit-source", rel(source_dir), "--report", rel(out / "compile_cuda.json"))  # fmt: skip
    if cuda_available():
        run("verify", rel(model), "--lib", rel(gpu_lib), "--report", rel(out / "verify_cuda.json"))
        return
    source = source_dir / f"{gpu_lib.stem}.cu"
    # Each kernel is declared, then defined: count names, not occurrences.
    kernels = len(set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(",
                                 source.read_text())))  # fmt: skip
    print(
        f"\nno GPU here: the CUDA build succeeded ({rel(gpu_lib)}, "
        f"{gpu_lib.stat().st_size // 1024} KiB; {rel(source)}, {kernels} kernels) but it is not "
        "run. On a GPU machine: gconv-compile verify "
        f"{rel(model)} --lib {rel(gpu_lib)}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
