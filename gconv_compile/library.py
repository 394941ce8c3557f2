"""A compiled library: its sidecar, reading it back, loading it, running it, bundling it.

``OUT.so.json`` (the sidecar) records what the library computes: the input and output names,
shapes and dtypes, the target, the sha256 of the model it was compiled from and of the library
itself, and, when there are any, the weights file it reads (``weights``) and the CUDA binary
compiled at build time and embedded in the library (``cuda_binary``). :func:`read_library_info` refuses a library whose sidecar
is missing or describes another file, so ``verify`` can tell when a library belongs to a
different model.

Loading and running is :mod:`gconv_compile.runtime`'s (TVM's runtime alone: no compiler, no
``tvm.relax``): :func:`load_library` wraps its :class:`~gconv_compile.runtime.Library` in a
:class:`Runner` that also carries the sidecar as a :class:`LibraryInfo`, and
:meth:`gconv_compile.build.CompiledModel.runner` makes one from a build in memory.
:func:`write_bundle` writes what a machine that only runs the library needs.
:func:`embed_cuda_binaries` puts the CUDA binaries into the bytes TVM packs into the library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gconv_compile import runtime
from gconv_compile._version import __version__
from gconv_compile.errors import UserError, one_line
from gconv_compile.model_io import LoadedModel
from gconv_compile.runtime import (  # noqa: F401 - re-exported: the sidecar is shared with runtime
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    RunFailed,
    TensorSpec,
    file_sha256,
    read_sidecar,
    sidecar_path,
)

logger = logging.getLogger(__name__)

CUDA_RUNTIME_NEEDS = (
    "A CUDA library needs an NVIDIA GPU and driver where it runs, and TVM's runtime "
    "(gconv-compile bundle writes it: no compiler). Its CUDA C is compiled at build time into a "
    "fatbin for --arch embedded in the library when nvcc is found (on PATH or under "
    "$CUDA_PATH/bin), so loading needs no CUDA compiler and no other file; otherwise nvcc is "
    "needed where it is loaded. Building needs no GPU."
)


@dataclasses.dataclass
class LibraryInfo:
    """What a compiled library computes and where it came from (the ``.so.json`` sidecar)."""

    model_sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    target: dict[str, Any]
    optimized: bool
    rewrites: int
    model: str | None = None
    library_sha256: str | None = None
    tvm_version: str = ""
    gconv_compile_version: str = __version__
    weights: dict[str, Any] | None = None  # {"file", "format", "names"}: read at load
    # {"format", "arch", "compiler", "embedded": True, "file": the library itself}
    cuda_binary: dict[str, Any] | None = None
    cuda_note: str | None = None  # why the CUDA C is compiled at load time

    @property
    def target_kind(self) -> str:
        return self.target["kind"]

    def to_dict(self) -> dict[str, Any]:
        data = {"format": SIDECAR_FORMAT, **dataclasses.asdict(self)}
        for key in ("weights", "cuda_binary", "cuda_note"):
            if data[key] is None:
                del data[key]
        if self.target_kind == "cuda":
            data["runtime_needs"] = CUDA_RUNTIME_NEEDS
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LibraryInfo:
        if data.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {SIDECAR_FORMAT!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        values["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        return cls(**values)


def model_fingerprint(loaded: LoadedModel) -> str:
    """sha256 of the model file's bytes, or of the deterministic serialisation in memory.

    Computed before any rewrite, so ``compile`` and ``verify`` of the same file agree.
    """
    if loaded.path is not None:
        return file_sha256(loaded.path)
    proto = ir.serde.serialize_model(loaded.model)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def read_library_info(library: str | os.PathLike) -> LibraryInfo:
    """Read and check a library's sidecar.

    Raises:
        UserError: The library or its sidecar is missing, unreadable, or describes another file.
    """
    data = read_sidecar(library)
    try:
        return LibraryInfo.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        side = sidecar_path(library)
        raise UserError(f"{side}: not a gconv-compile library description ({one_line(exc)})")


def load_library(library: str | os.PathLike, *, threads: int | None = None) -> Runner:
    """Load an exported library with TVM's runtime alone; see :func:`gconv_compile.runtime.load`.

    Raises:
        UserError: Missing/mismatched sidecar, no GPU for a CUDA library, a CPU that cannot
            run the code, or a weights file that does not fit.
    """
    info = read_library_info(library)
    return Runner(runtime.load(library, threads=threads), info)


class Runner:
    """A loaded model and its sidecar: :class:`gconv_compile.runtime.Library` plus ``info``."""

    def __init__(self, library: runtime.Library, info: LibraryInfo) -> None:
        self.library = library
        self.info = info

    @classmethod
    def from_executable(
        cls, executable: Any, info: LibraryInfo, weights: Mapping[str, np.ndarray] | None = None
    ) -> Runner:
        """A VM over a build in memory (``weights``: the arrays a weights-file build reads)."""
        module = executable.jit()
        return cls(runtime.open_module(module, info.to_dict(), weights=weights), info)

    @property
    def device_name(self) -> str:
        return self.library.device

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` maps every input name to an array.

        Raises:
            UserError: A missing/unknown input, or a shape or dtype the library cannot take.
            RunFailed: The model failed on inputs it accepts.
        """
        return self.library.run(feeds)


# ------------------------------------------------------------------------------- bundle

# What a machine that only runs libraries needs of gconv_compile (numpy and tvm-ffi only).
BUNDLE_MODULES = ("errors.py", "host.py", "runtime.py")
BUNDLE_INIT = '''"""The runtime subset of gconv-compile: gconv_compile.runtime.load(PATH)."""\n'''
FFI_PLATFORM = "manylinux_2_28_x86_64"


def write_bundle(
    library: str | os.PathLike, out: str | os.PathLike, *, python: str = "3.12",
    wheels: str | os.PathLike | None = None,
) -> int:  # fmt: skip
    """Write what a machine that only runs ``library`` needs into ``out``; returns its bytes.

    ``OUT/`` gets the library, its sidecar, its weights file and prebuilt CUDA binaries;
    ``OUT/python/gconv_compile/`` the loader; ``OUT/runtime/`` ``libtvm_runtime.so`` (and
    ``libtvm_runtime_cuda.so`` and ``libcudart.so.13`` for a CUDA library) and the tvm-ffi wheel
    for CPython ``python`` on x86-64, from ``wheels`` or downloaded with pip.

    Raises:
        UserError: A library that does not check out, an output that is not an empty or new
            folder, a bad ``python``, or no tvm-ffi wheel for it.
    """
    source, target = Path(library), Path(out)
    info = read_library_info(source)
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise UserError(f"--python {python}: expected MAJOR.MINOR, e.g. 3.12")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target}: exists and is not an empty folder")
    target.mkdir(parents=True, exist_ok=True)
    companions = [(entry or {}).get("file") for entry in (info.weights, info.cuda_binary)]
    companions = [name for name in companions if name != source.name]
    for name in [source.name, sidecar_path(source).name, *filter(None, companions)]:
        shutil.copy2(source.parent / name, target / name)
    write_loader(target / "python")
    write_runtime(target / "runtime", cuda=info.target_kind == "cuda", python=python, wheels=wheels)
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def write_loader(folder: Path, extra: tuple[str, ...] = ()) -> Path:
    """``folder/gconv_compile/``: the loader's modules (and ``extra`` ones, numpy-only)."""
    package = folder / "gconv_compile"
    package.mkdir(parents=True)
    for name in (*BUNDLE_MODULES, *extra):
        shutil.copy2(Path(runtime.__file__).parent / name, package / name)
    (package / "__init__.py").write_text(BUNDLE_INIT)
    return package


def write_runtime(
    folder: Path, *, cuda: bool, python: str, wheels: str | os.PathLike | None
) -> None:
    """``folder/``: TVM's runtime library (and its CUDA module and libcudart for ``cuda``) and
    the tvm-ffi wheel for CPython ``python``."""
    folder.mkdir(parents=True, exist_ok=True)
    shared = [runtime.runtime_dir() / "libtvm_runtime.so"]
    if cuda:
        shared.append(runtime.runtime_dir() / "libtvm_runtime_cuda.so")
        cudart = runtime.find_cudart(runtime.runtime_dir())
        if cudart is None:
            raise UserError(f"no {runtime.CUDART} here to bundle (set CUDA_PATH to the toolkit)")
        shared.append(cudart)
    for path in shared:
        shutil.copy2(path, folder / path.name)
    _bundle_ffi_wheel(folder, python, wheels)


def _bundle_ffi_wheel(folder: Path, python: str, wheels: str | os.PathLike | None) -> Path:
    """The apache-tvm-ffi wheel of the version installed here, for CPython ``python``."""
    version = importlib.metadata.version("apache-tvm-ffi")
    pattern = f"apache_tvm_ffi-{version}-cp{python.replace('.', '')}-*.whl"
    found = sorted(Path(wheels).glob(pattern)) if wheels is not None else []
    if found:
        return Path(shutil.copy2(found[-1], folder / found[-1].name))
    command = [
        sys.executable, "-m", "pip", "download", "-q", f"apache-tvm-ffi=={version}",
        "--python-version", python, "--implementation", "cp", "--only-binary=:all:",
        "--platform", FFI_PLATFORM, "--no-deps", "-d", str(folder),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob(pattern))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"no apache-tvm-ffi {version} wheel for Python {python}: pip download failed "
            f"({last[:200]}); pass --wheels DIR holding {pattern}"
        )
    return found[-1]


# ------------------------------------------------------------------------------- CUDA binaries


def embed_cuda_binaries(blob: bytes, binaries: Sequence[tuple[str, bytes]], fmt: str) -> bytes:
    """TVM's packed imports with each CUDA module's CUDA C replaced by its binary.

    ``blob`` is what ``runtime.ModulePackImportsToTensor`` returns and ``export_library`` links
    into the library: a little-endian u64 size, the import tree (two u64 vectors), then per
    module its kind and, unless it is the host code (``_lib``), the bytes of its
    ``SaveToBytes``. A CUDA module's bytes are ``[fmt][function info][code]`` (TVM 0.27
    ``cuda_module.cc``); a module saved with fmt "cuda" holds CUDA C that the runtime compiles
    at load, one with "fatbin" or "cubin" holds machine code the driver loads as it is.

    Args:
        blob: The packed imports.
        binaries: (CUDA C source, its binary) pairs, one per CUDA module.
        fmt: The binaries' format ("fatbin").

    Raises:
        ValueError: The blob is not in the layout above, or a CUDA module has no binary.
    """
    reader = _Reader(blob)
    if reader.u64() != len(blob) - 8:
        raise ValueError("the packed imports' size header does not match")
    start = reader.pos
    groups = reader.u64s()
    reader.u64s()
    out = [blob[start : reader.pos]]
    for _ in range(len(groups) - 1):
        kind = reader.text()
        out.append(_packed(kind))
        if kind == b"_lib":
            continue
        body = reader.text()
        if kind == b"cuda" and body.startswith(_packed(b"cuda")):
            body = _cuda_body(body, binaries, fmt.encode())
        out.append(_packed(body))
    if reader.pos != len(blob):
        raise ValueError("the packed imports have trailing bytes")
    rebuilt = b"".join(out)
    return struct.pack("<Q", len(rebuilt)) + rebuilt


def _cuda_body(body: bytes, binaries: Sequence[tuple[str, bytes]], fmt: bytes) -> bytes:
    """``[fmt][function info][CUDA C]`` -> ``[fmt][the same function info][binary]``."""
    for source, binary in binaries:
        tail = _packed(source.encode("utf-8"))
        if body.endswith(tail):
            info = body[len(_packed(b"cuda")) : len(body) - len(tail)]
            return _packed(fmt) + info + _packed(binary)
    raise ValueError("a CUDA module of the build has no compiled binary")


def _packed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


class _Reader:
    """Reads TVM's byte stream: u64 sizes, u64 vectors, length-prefixed strings."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise ValueError("the packed imports end early")
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def u64s(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def text(self) -> bytes:
        size = self.u64()
        if self.pos + size > len(self.data):
            raise ValueError("the packed imports end early")
        self.pos += size
        return self.data[self.pos - size : self.pos]
