"""`make demo`: build the example model, then run gconv-compile on it as a user would."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def run(*args: str) -> None:
    print(f"\n$ gconv-compile {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "gconv_compile", *args])
    if done.returncode != 0:
        sys.exit(done.returncode)


def main() -> None:
    sys.path.insert(0, str(HERE))
    import onnx
    from model import build_model

    OUT.mkdir(exist_ok=True)
    model_path = OUT / "chunked_resnext.onnx"
    onnx.save(build_model(), model_path)
    print(f"wrote {model_path.relative_to(Path.cwd()) if model_path.is_relative_to(Path.cwd()) else model_path}"
          " (3 ResNeXt blocks, each grouped conv written as Split -> 8 Conv -> Concat)")  # fmt: skip
    rel = lambda p: str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)  # noqa: E731
    run(
        "optimize",
        rel(model_path),
        "-o",
        rel(OUT / "folded.onnx"),
        "--report",
        rel(OUT / "optimize.json"),
    )
    extra = HERE / "compile_demo.py"
    if extra.exists():
        done = subprocess.run([sys.executable, str(extra), rel(model_path), rel(OUT)])
        if done.returncode != 0:
            sys.exit(done.returncode)


if __name__ == "__main__":
    main()
