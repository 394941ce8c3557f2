"""A compiled library: its sidecar, reading it back, loading it, and running it.

``OUT.so.json`` (the sidecar) records what the library computes: the input and output names,
shapes and dtypes, the target, and the sha256 of the model it was compiled from and of the
library itself. :func:`read_library_info` refuses a library whose sidecar is missing or describes
another file, so ``verify`` can tell when a library belongs to a different model.
:func:`load_library` makes a :class:`Runner` (a Relax VM fed by ONNX tensor name) from a library
written by any process; :class:`gconv_compile.build.CompiledModel` makes one from a build in
memory.

A CUDA library holds CUDA C, not machine code: TVM compiles it when the library is loaded. So a
CUDA build needs no GPU, but the machine that *runs* it needs what :data:`CUDA_RUNTIME_NEEDS`
says.

TVM is imported inside the functions that load and run, not at the top: ``verify`` reads
sidecars and ``TensorSpec`` before it decides to load anything, and ``optimize``/``expand``
import this module's neighbours without ever needing TVM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from gconv_compile._version import __version__
from gconv_compile.errors import GconvError, UserError, tvm_message
from gconv_compile.model_io import LoadedModel
from gconv_compile.targets import cuda_available, host_can_run

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "gconv-compile-library/1"
CUDA_RUNTIME_NEEDS = (
    "A CUDA library holds CUDA C that TVM compiles when the library is loaded, so the machine "
    "that runs it needs an NVIDIA GPU and driver, apache-tvm, the CUDA toolkit headers "
    "(CUDA_PATH=/usr/local/cuda, or nvcc on PATH), and a CUDA compiler: NVRTC "
    "(pip install cuda-bindings nvidia-cuda-nvrtc; TVM's default) or nvcc "
    "(TVM_CUDA_COMPILE_MODE=nvcc; chosen automatically when cuda-bindings is missing and nvcc "
    "is on PATH). Building needs none of this."
)


@dataclasses.dataclass
class TensorSpec:
    """Name, shape (ints, symbol names, or None for an unnamed dim) and dtype of a tensor."""

    name: str
    shape: list[int | str | None] | None
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: ir.Value) -> TensorSpec:
        shape = None
        if value.shape is not None:
            shape = [d if isinstance(d, int) else d.value for d in value.shape]
        dtype = value.dtype.numpy().name if value.dtype is not None else "float32"
        return cls(value.name, shape, dtype)

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether an array of ``shape`` fits (same rank, same size on every static dim)."""
        if self.shape is None:
            return True
        return len(shape) == len(self.shape) and all(
            not isinstance(d, int) or d == s for d, s in zip(self.shape, shape)
        )

    def describe(self) -> str:
        dims = (
            "?"
            if self.shape is None
            else "x".join("?" if d is None else str(d) for d in self.shape)
        )
        return f"{self.name} {self.dtype}[{dims}]"


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

    @property
    def target_kind(self) -> str:
        return self.target["kind"]

    def to_dict(self) -> dict[str, Any]:
        data = {"format": SIDECAR_FORMAT, **dataclasses.asdict(self)}
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


def sidecar_path(library: str | os.PathLike) -> Path:
    return Path(str(library) + SIDECAR_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(loaded: LoadedModel) -> str:
    """sha256 of the model file's bytes, or of the deterministic serialisation in memory.

    Computed before any rewrite, so ``compile`` and ``verify`` of the same file agree.
    """
    if loaded.path is not None:
        return file_sha256(loaded.path)
    proto = ir.serde.serialize_model(loaded.model)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


class RunFailed(GconvError):
    """The compiled model failed on inputs it accepts: a wrong result, not bad input."""

    exit_code = 1


def read_library_info(library: str | os.PathLike) -> LibraryInfo:
    """Read and check a library's sidecar.

    Raises:
        UserError: The library or its sidecar is missing, unreadable, or describes another file.
    """
    path = Path(library)
    if not path.is_file():
        raise UserError(f"{path}: no such library")
    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(
            f"{path}: no {side.name} beside it; compile the model with gconv-compile to get one"
        )
    try:
        info = LibraryInfo.from_dict(json.loads(side.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{side}: not a gconv-compile library description ({exc})")
    if info.library_sha256 != file_sha256(path):
        raise UserError(f"{side} describes another library than {path} (sha256 differs)")
    return info


def load_library(library: str | os.PathLike) -> Runner:
    """Load an exported library (from any process) and make a VM on its target's device.

    Raises:
        UserError: Missing/mismatched sidecar, no GPU for a CUDA library, a CPU that cannot
            run the code, or no CUDA compiler to finish loading a CUDA library.
    """
    import tvm  # see the module docstring

    info = read_library_info(library)
    if info.target_kind == "cuda":
        if not cuda_available():
            raise UserError(f"{library}: a CUDA library needs a GPU and none is visible")
        _choose_cuda_compiler()
    else:
        reason = host_can_run(info.target)
        if reason:
            raise UserError(f"{library}: cannot run here: {reason}")
    try:
        module = tvm.runtime.load_module(str(library))
    except Exception as exc:
        hint = f" ({CUDA_RUNTIME_NEEDS})" if info.target_kind == "cuda" else ""
        raise UserError(f"{library}: TVM cannot load it: {tvm_message(exc)}{hint}")
    return Runner(module, info)


def _choose_cuda_compiler() -> None:
    """Use nvcc when NVRTC's Python bindings are missing (TVM's default is NVRTC)."""
    if os.environ.get("TVM_CUDA_COMPILE_MODE"):
        return
    try:
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError:
        if shutil.which("nvcc"):
            logger.info("cuda-bindings not installed; TVM compiles the CUDA C with nvcc")
            os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
        else:
            raise UserError(f"no CUDA compiler to load the library with. {CUDA_RUNTIME_NEEDS}")


class Runner:
    """A Relax VM over a compiled model, fed and read by ONNX tensor name."""

    def __init__(self, module, info: LibraryInfo) -> None:
        import tvm
        from tvm import relax

        self.info = info
        self.device = tvm.cuda(0) if info.target_kind == "cuda" else tvm.cpu(0)
        if info.target_kind == "cuda" and not cuda_available():
            raise UserError("a CUDA build runs on a GPU and none is visible")
        if info.target_kind == "cuda":
            _choose_cuda_compiler()
        try:
            self.vm = relax.VirtualMachine(module, self.device)
        except Exception as exc:
            raise UserError(f"TVM cannot start the model's VM: {tvm_message(exc)}")
        self._main = self.vm["main"]

    @property
    def device_name(self) -> str:
        return "cuda:0" if self.info.target_kind == "cuda" else "cpu"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` maps every input name to an array.

        Raises:
            UserError: A missing/unknown input, or a shape or dtype the library cannot take.
        """
        import tvm

        names = [spec.name for spec in self.info.inputs]
        missing = [n for n in names if n not in feeds]
        unknown = sorted(set(feeds) - set(names))
        if missing or unknown:
            raise UserError(
                f"inputs do not match the library: missing {missing}, unknown {unknown}"
            )
        args = []
        for spec in self.info.inputs:
            array = np.ascontiguousarray(feeds[spec.name])
            if array.dtype.name != spec.dtype:
                raise UserError(
                    f"input '{spec.name}': dtype {array.dtype.name}, the library takes {spec.dtype}"
                )
            if not spec.accepts(array.shape):
                raise UserError(
                    f"input '{spec.name}': shape {list(array.shape)}, the library takes "
                    f"{spec.describe()}"
                )
            args.append(self._tensor(array))
        try:
            result = self._main(*args)
        except Exception as exc:
            raise RunFailed(f"the compiled model failed to run: {tvm_message(exc)}")
        values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        if len(values) != len(self.info.outputs):
            raise UserError(
                f"the compiled model returned {len(values)} value(s) for "
                f"{len(self.info.outputs)} output(s)"
            )
        return {spec.name: value.numpy() for spec, value in zip(self.info.outputs, values)}

    def _tensor(self, array: np.ndarray):
        """The input as a TVM tensor: read in place on the CPU when DLPack allows, else copied."""
        import tvm

        on_cpu = self.device.dlpack_device_type() == 1
        if on_cpu and array.flags.writeable and array.ctypes.data % 64 == 0:
            try:  # as onnxruntime does; DLPack needs 64-byte alignment
                return tvm.runtime.from_dlpack(array)
            except (BufferError, RuntimeError, ValueError):
                pass
        return tvm.runtime.tensor(array, device=self.device)

    def time_runs(
        self, feeds: Mapping[str, np.ndarray], *, warmup: int = 3, runs: int = 20
    ) -> list[float]:
        """Seconds per run, inputs already on the device, synchronised after each run."""
        import tvm

        args = [
            tvm.runtime.tensor(np.ascontiguousarray(feeds[spec.name]), device=self.device)
            for spec in self.info.inputs
        ]
        for _ in range(warmup):
            self._main(*args)
        self.device.sync()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            self._main(*args)
            self.device.sync()
            times.append(time.perf_counter() - started)
        return times
