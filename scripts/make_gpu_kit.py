"""Build the GPU kit: everything a bare GPU machine needs to check and time our CUDA code.

    .venv/bin/python scripts/make_gpu_kit.py [--out dist/gpu-kit] [--no-cuda]

``make gpu-kit`` runs this. The kit (at most 56 MiB, checked here) holds:

- ``runtime/``: the tvm-ffi wheel for CPython 3.12 x86-64, ``libtvm_runtime.so``,
  ``libtvm_runtime_cuda.so`` and ``libcudart.so.13`` (the TVM runtime without its compiler);
- ``kit/``: ``gpu_run.py`` and its helpers, ``resnext_model.py``, and the runtime subset of
  ``gconv_compile`` (``errors``, ``host``, ``runtime``, ``compare``);
- ``libs/``: for each model and dtype an sm_90 library (its CUDA C compiled here with nvcc into a
  fatbin embedded in it, so loading needs no CUDA compiler) and its llvm twin for the rehearsal;
- ``models/``: the ONNX models (ResNeXt-50 is regenerated from its seed on the machine, and its
  libraries take their weights from a file written there);
- ``manifest.json`` and ``run.sh``.

All libraries are built in this one process: TVM's CUDA build imports dlight once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
for folder in ("gpu_kit", "benchmarks", "tests", "examples/01_chunked_conv"):
    sys.path.insert(0, str(ROOT / folder))

import kit_models  # noqa: E402
import model as example01  # noqa: E402
from grouped_models import zoo_model  # noqa: E402

import gconv_compile  # noqa: E402
from gconv_compile.errors import GconvError  # noqa: E402
from gconv_compile.library import write_loader, write_runtime  # noqa: E402

WEIGHTS_FILE_BYTES = 4 << 20  # generated models with more weights ship them as a seed

MAX_BYTES = 56 * 1024 * 1024
ARCH = "sm_90"
KIT_SOURCES = ("gpu_kit/gpu_run.py", "gpu_kit/kit_models.py", "gpu_kit/torch_reference.py",
               "benchmarks/resnext_model.py", "benchmarks/mobilenet_model.py")  # fmt: skip


@dataclass
class Entry:
    """One model in one dtype: what to compile and how the kit checks and times it.

    A generated model (``generate``) is remade from its seed on the machine, and its libraries
    take their weights from a file written there; the others ship their ONNX model and carry
    their weights in the code (the fold needs constant weights, and they are small).
    """

    name: str
    dtype: str
    model: onnx.ModelProto
    kind: str  # "conv": torch times F.conv2d; "model": torch runs the ONNX graph
    conv: dict | None = None
    generate: dict | None = None
    shapes: dict | None = None
    env: dict | None = None  # set while compiling (GCONV_TENSOR_CORES=0: the CUDA-core form)

    @property
    def stem(self) -> str:
        return f"{self.name}.{self.dtype}"


def entries() -> list[Entry]:
    """The kit's models: float32 everywhere, float16 for the convs and the branchy block."""
    out = [
        # float16 example01 fails in TVM 0.27's importer: its float16 BatchNormalization feeds a
        # Conv with bias, and the build stops at "Binary operators must have the same datatype".
        Entry("example01", "float32", example01.build_model(), "model",
              shapes={"image": [1, 3, 28, 28]}),
        Entry("resnext50", "float32", kit_models.resnext50(), "model",
              generate=kit_models.generator_spec()),
    ]  # fmt: skip
    resnext = {shape.name for shape in kit_models.resnext_convs()}
    for shape in kit_models.resnext_convs() + kit_models.mobilenet_convs():
        spec = kit_models.generator_spec(shape)
        conv = kit_models.conv_info(shape).to_dict()
        for dtype in ("float32", "float16"):
            model = kit_models.generate(spec, dtype)
            out.append(Entry(shape.name, dtype, model, "conv", conv, generate=spec))
        if shape.name in resnext:  # float16 on CUDA cores too: what the tensor cores gain
            model = kit_models.generate(spec, "float16")
            out.append(Entry(f"{shape.name}-cuda-cores", "float16", model, "conv", conv,
                             generate=spec, env={"GCONV_TENSOR_CORES": "0"}))  # fmt: skip
    out.append(Entry("shufflenet_v1", "float32", zoo_model("light_shufflenet"), "model"))
    block = kit_models.branchy_block()
    out.append(Entry("resnext_block_branchy", "float32", block, "model"))
    out.append(Entry("resnext_block_branchy", "float16", kit_models.to_float16(block), "model"))
    return out


def build_libraries(entry: Entry, libs: Path, models: Path, cuda: bool) -> dict:
    """Compile ``entry`` for llvm (and sm_90), write its ONNX model; returns its manifest row.

    ``compile`` itself compiles the CUDA C with nvcc into a fatbin embedded in the library (or
    notes why not) and, for a generated model, writes the weights file, which the kit drops:
    the machine writes it again from the seed.
    """
    row = {"name": entry.name, "dtype": entry.dtype, "kind": entry.kind, "conv": entry.conv,
           "libraries": {}, "reduction": kit_models.reduction_depth(entry.model)}  # fmt: skip
    # a generated model's big weights go to a file the machine writes again from the seed; small
    # ones stay constants in the library, where the build may repack them (the float16 convs'
    # tensor-core weights: as a file they would be repacked by a kernel on every run)
    big = sum(init.ByteSize() for init in entry.model.graph.initializer) > WEIGHTS_FILE_BYTES
    weights = libs / f"{entry.stem}.weights.npz" if entry.generate and big else None
    if entry.generate:
        row["generate"] = entry.generate
    else:
        onnx.save(entry.model, models / f"{entry.stem}.onnx")
        row["onnx"] = f"models/{entry.stem}.onnx"
    for target in ["llvm", "cuda"] if cuda else ["llvm"]:
        library = libs / f"{entry.stem}.{target}.so"
        saved = {k: os.environ.get(k) for k in entry.env or {}}
        os.environ.update(entry.env or {})
        try:
            compiled = gconv_compile.compile(
                entry.model, target, output=library, arch=ARCH if target == "cuda" else None,
                check=entry.dtype == "float32", shapes=entry.shapes, weights_file=weights,
            )  # fmt: skip
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
        if target == "cuda" and not compiled.info.cuda_binary:
            row["cuda_build_error"] = compiled.info.cuda_note
            print(f"make_gpu_kit: {library.name}: {compiled.info.cuda_note}", file=sys.stderr)
        row["libraries"][target] = f"libs/{library.name}"
    if weights is not None:
        weights.unlink()
    return row


def copy_sources(out: Path, wheels: Path) -> None:
    """The runner, the loader and TVM's runtime for CPython 3.12, as ``gconv-compile bundle``
    writes them."""
    kit = out / "kit"
    write_loader(kit, extra=("compare.py",))
    for source in KIT_SOURCES:
        shutil.copy(ROOT / source, kit)
    shutil.copy(ROOT / "gpu_kit" / "run.sh", out)
    write_runtime(out / "runtime", cuda=True, python="3.12", wheels=wheels)


def kit_size(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "gpu-kit")
    parser.add_argument("--wheels", type=Path, default=ROOT / "build" / "wheels")
    parser.add_argument("--no-cuda", action="store_true", help="llvm twins only (quick tries)")
    parser.add_argument("--only", nargs="+", help="build only these model names (quick tries)")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUDA_PATH", "/usr/local/cuda")
    started = time.perf_counter()
    if args.out.exists():
        shutil.rmtree(args.out)
    libs, models = args.out / "libs", args.out / "models"
    libs.mkdir(parents=True)
    models.mkdir()
    try:
        copy_sources(args.out, args.wheels)
    except GconvError as error:
        print(f"make_gpu_kit: {error}", file=sys.stderr)
        return 2
    rows = []
    for entry in [e for e in entries() if not args.only or e.name in args.only]:
        print(f"build {entry.stem}", flush=True)
        try:
            rows.append(build_libraries(entry, libs, models, not args.no_cuda))
        except GconvError as error:
            print(f"make_gpu_kit: {entry.stem}: {error}", file=sys.stderr)
            return 2
    rejected = sum(1 for row in rows if row.get("cuda_build_error"))
    manifest = {"format": "gconv-gpu-kit/1", "arch": ARCH, "built": time.strftime("%Y-%m-%d"),
                "models": rows}  # fmt: skip
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = kit_size(args.out)
    minutes = (time.perf_counter() - started) / 60
    if rejected:
        print(f"make_gpu_kit: nvcc rejected {rejected} CUDA librar{'y' if rejected == 1 else 'ies'};"
              " the kit reports them as failed", file=sys.stderr)  # fmt: skip
    print(f"make_gpu_kit: {args.out}: {len(rows)} models, {size / 2**20:.1f} MiB "
          f"(limit {MAX_BYTES / 2**20:.0f} MiB), built in {minutes:.1f} min")  # fmt: skip
    if size > MAX_BYTES:
        print(f"make_gpu_kit: the kit is {size / 2**20:.1f} MiB, over the limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
