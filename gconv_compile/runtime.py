"""Run a compiled library with TVM's runtime alone: ``tvm_ffi`` and ``libtvm_runtime.so``.

The machine that runs a model needs neither TVM's 260 MB compiler library nor ``tvm.relax``
(which, in TVM 0.27, cannot be imported without it). This module loads the runtime library
with ``ctypes``, loads the exported library with ``tvm_ffi.load_module`` and drives its Relax
VM through the module's own functions, as ``tvm.relax.VirtualMachine`` does::

    OUT.so --tvm_ffi.load_module--> relax.VMExecutable --vm_load_executable()--> VM module
        --vm_initialization(device, allocator, [cpu, allocator])--> vm["main"](*inputs, *weights)

It imports only numpy, ``tvm_ffi`` and the standard library (plus ``gconv_compile.errors``), so
it runs from a bundle that carries ``gconv_compile/{__init__,errors,runtime}.py``, the tvm-ffi
wheel and ``libtvm_runtime.so`` (``gconv-compile bundle``, ``make gpu-kit``).

Where the runtime library comes from: ``$GCONV_TVM_RUNTIME_DIR`` if set, else the ``lib/``
folder of the installed ``tvm`` package (found without importing it).

CPU libraries run on every core this process may use (``os.sched_getaffinity``); TVM's own
default pool takes one thread per physical core, half of them on a machine with SMT.

A CUDA library compiled where nvcc was found holds a fatbin for its arch (the sidecar's
``cuda_binary`` says ``"embedded": true``): TVM's CUDA module hands it to the driver as it is,
and loading needs no CUDA compiler. A library that holds CUDA C asks for machine code through
``tvm_callback_cuda_compile`` when it loads; the loader answers from a file of prebuilt binaries
keyed by source sha256 when the sidecar names one (libraries from before embedding), else
with ``nvcc`` (on PATH or under ``$CUDA_PATH/bin``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm_ffi

from gconv_compile.errors import GconvError, UserError, one_line
from gconv_compile.host import host_can_run

logger = logging.getLogger(__name__)

RUNTIME_DIR_ENV = "GCONV_TVM_RUNTIME_DIR"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "gconv-compile-library/1"
CPU, CUDA = 1, 2  # DLPack device types
POOLED_ALLOCATOR = 2  # tvm.relax.VirtualMachine.POOLED_ALLOCATOR
SHARE_ALL_CORES = -3  # TVM's AffinityMode kSpecifyThreadShareAllCore
ALIGNMENT = 64  # TVM reads CPU inputs in place only when 64-byte aligned
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                      "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8"}  # fmt: skip


class RunFailed(GconvError):
    """The compiled model failed on inputs it accepts: a wrong result, not bad input."""

    exit_code = 1


# ------------------------------------------------------------------------------- sidecar


@dataclasses.dataclass
class TensorSpec:
    """Name, shape (ints, symbol names, or None for an unnamed dim) and dtype of a tensor."""

    name: str
    shape: list[int | str | None] | None
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> TensorSpec:
        """From an onnx-ir ``Value``, read by attribute (this module does not import onnx-ir)."""
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


def sidecar_path(library: str | os.PathLike) -> Path:
    return Path(str(library) + SIDECAR_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sidecar(library: str | os.PathLike) -> dict[str, Any]:
    """The library's sidecar as a dict, checked: format, and the library's sha256.

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
        data = json.loads(side.read_text())
        if data.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {SIDECAR_FORMAT!r}")
        for key in ("inputs", "outputs", "target"):
            if key not in data:
                raise KeyError(key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{side}: not a gconv-compile library description ({one_line(exc)})")
    if data.get("library_sha256") != file_sha256(path):
        raise UserError(f"{side} describes another library than {path} (sha256 differs)")
    return data


# ------------------------------------------------------------------------------- runtime library


def runtime_dir() -> Path:
    """The folder holding ``libtvm_runtime.so``: ``$GCONV_TVM_RUNTIME_DIR`` or tvm's ``lib/``."""
    configured = os.environ.get(RUNTIME_DIR_ENV)
    if configured:
        return Path(configured)
    spec = importlib.util.find_spec("tvm")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"no TVM runtime: set {RUNTIME_DIR_ENV} to the folder holding libtvm_runtime.so, "
            "or install apache-tvm"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


_loaded: dict[str, ctypes.CDLL] = {}


def _load_shared(name: str, folder: Path, mode: int) -> ctypes.CDLL:
    if name not in _loaded:
        path = folder / name
        if not path.is_file():
            raise UserError(f"no {name} in {folder} (set {RUNTIME_DIR_ENV} to its folder)")
        try:
            _loaded[name] = ctypes.CDLL(str(path), mode=mode)
        except OSError as exc:
            raise UserError(f"{path}: cannot load: {one_line(exc)}")
    return _loaded[name]


def load_runtime(*, cuda: bool = False) -> Path:
    """Load ``libtvm_runtime.so`` (and the CUDA runtime module for ``cuda``); returns its folder."""
    folder = runtime_dir()
    _load_shared("libtvm_runtime.so", folder, ctypes.RTLD_GLOBAL)
    if cuda and not _has_global("ffi.Module.load_from_bytes.cuda"):
        try:
            _loaded.setdefault("libcuda.so.1", ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL))
        except OSError:
            raise UserError("a CUDA library needs a GPU and none is visible (no NVIDIA driver)")
        _load_cudart(folder)
        _load_shared("libtvm_runtime_cuda.so", folder, ctypes.RTLD_LOCAL)
    return folder


def _has_global(name: str) -> bool:
    return tvm_ffi.get_global_func(name, allow_missing=True) is not None


CUDART = "libcudart.so.13"


def find_cudart(folder: Path) -> Path | None:
    """libcudart.so.13 (CUDA 13 runtime): in ``folder``, a pip wheel on sys.path, or CUDA_PATH."""
    candidates = [folder / CUDART]
    for entry in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_runtime/lib"):
            candidates.append(Path(entry) / sub / CUDART)
    for root in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates += [Path(root) / "lib64" / CUDART, Path(root) / "lib" / CUDART]
    return next((path for path in candidates if path.is_file()), None)


def _load_cudart(folder: Path) -> None:
    """libtvm_runtime_cuda.so needs libcudart.so.13; one already in the process (torch loads
    its own) is used rather than a second copy."""
    try:
        _loaded[CUDART] = ctypes.CDLL(CUDART, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    path = find_cudart(folder)
    if path is None:
        raise UserError(f"no {CUDART} (CUDA 13 runtime) in the bundle, a pip wheel or CUDA_PATH")
    _load_shared(CUDART, path.parent, ctypes.RTLD_GLOBAL)


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def set_threads(threads: int | None = None) -> int:
    """Size TVM's CPU thread pool (default: every usable core); returns the count."""
    cores = usable_cores()
    count = len(cores) if threads is None else threads
    if count < 1:
        raise UserError(f"threads must be 1 or more, not {count}")
    load_runtime()
    configure = tvm_ffi.get_global_func("runtime.config_threadpool")
    configure(SHARE_ALL_CORES, count, [str(cpu) for cpu in cores])
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


# ------------------------------------------------------------------------------- CUDA code


def cuda_source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def read_cuda_binaries(path: Path) -> dict[str, bytes]:
    """Prebuilt CUDA binaries keyed by source sha256 (an .npz of uint8 arrays)."""
    try:
        with np.load(path) as archive:
            return {key: archive[key].tobytes() for key in archive.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the prebuilt CUDA binaries: {one_line(exc)}")


_cuda_binaries: dict[str, bytes] = {}
# How TVM's requests for CUDA machine code were answered in this process (the GPU kit reports it).
cuda_code_sources = {"prebuilt": 0, "nvcc": 0}


def _register_cuda_compile(binaries: Mapping[str, bytes], arch: str) -> None:
    """Answer TVM's ``tvm_callback_cuda_compile``: a prebuilt binary, else nvcc for ``arch``."""
    _cuda_binaries.update(binaries)

    def compile_cuda(source: str, *_: Any) -> bytes:
        key = cuda_source_sha256(source)
        if key in _cuda_binaries:
            cuda_code_sources["prebuilt"] += 1
            return _cuda_binaries[key]
        cuda_code_sources["nvcc"] += 1
        binary = nvcc_compile(source, arch)
        _cuda_binaries[key] = binary
        return binary

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def find_nvcc() -> str | None:
    cuda_path = os.environ.get("CUDA_PATH")
    if cuda_path and (Path(cuda_path) / "bin" / "nvcc").is_file():
        return str(Path(cuda_path) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_compile(source: str, arch: str) -> bytes:
    """Compile TVM's CUDA C to a fatbin for ``arch`` (e.g. sm_90) with nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise UserError(
            "this CUDA library holds CUDA C and no prebuilt binary for it; loading needs nvcc "
            "(on PATH or $CUDA_PATH/bin), or rebuild it where nvcc is available"
        )
    digits = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="gconv-nvcc-") as tmp:
        code, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        code.write_text(source)
        command = [nvcc, "--fatbin", "-O3", "-gencode", f"arch=compute_{digits},code=sm_{digits}",
                   "-o", str(out), str(code)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr + done.stdout).strip().splitlines()
            errors = [ln.strip() for ln in lines if "error" in ln] or lines[-1:]
            raise UserError(f"nvcc cannot compile the library's CUDA C: {errors[0][:300]}")
        return out.read_bytes()


# ------------------------------------------------------------------------------- weights


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Arrays by name from an .npz or .safetensors file."""
    if not path.is_file():
        raise UserError(f"{path}: the library's weights file is missing")
    try:
        if path.suffix == ".npz":
            with np.load(path) as archive:
                return {key: archive[key] for key in archive.files}
        return _read_safetensors(path)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise UserError(f"{path}: cannot read the weights: {one_line(exc)}")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    body = memoryview(raw)[8 + size :]
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        arrays[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(entry["shape"])
    return arrays


# ------------------------------------------------------------------------------- library


class Library:
    """A compiled model on its device, fed and read by ONNX tensor name.

    Attributes:
        path: The library file.
        info: Its sidecar (inputs, outputs, target, weights, CUDA binaries).
        device: "cpu" or "cuda:0".
        threads: Size of TVM's CPU thread pool.
    """

    def __init__(
        self, path: Path | None, info: dict[str, Any], module: Any, threads: int,
        weights: Mapping[str, np.ndarray] | None = None,
    ) -> None:  # fmt: skip
        self.path, self.info, self.threads = path, info, threads
        self._inputs = [TensorSpec(**t) for t in info["inputs"]]
        self._outputs = [TensorSpec(**t) for t in info["outputs"]]
        kind = info["target"]["kind"]
        self._device = tvm_ffi.device("cuda" if kind == "cuda" else "cpu", 0)
        try:
            self._vm = module["vm_load_executable"]()
            init = [self._device.dlpack_device_type(), 0, POOLED_ALLOCATOR]
            if kind == "cuda":  # shape functions run on the CPU
                init += [CPU, 0, POOLED_ALLOCATOR]
            self._vm["vm_initialization"](*init)
            self._main = self._vm["main"]
        except Exception as exc:
            raise UserError(f"{path}: cannot start the model's VM: {one_line(exc)}")
        self._weights = self._load_weights(weights)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self._outputs]

    @property
    def device(self) -> str:
        return "cuda:0" if self._device.dlpack_device_type() == CUDA else "cpu"

    def _load_weights(self, given: Mapping[str, np.ndarray] | None) -> list[Any]:
        """The weights on the device in the library's order: ``given``, or from the file."""
        entry = self.info.get("weights")
        if not entry:
            return []
        if given is not None:
            arrays = given
        elif self.path is not None:
            arrays = read_weights(self.path.parent / entry["file"])
        else:
            raise UserError("a library that reads its weights from a file needs its path")
        missing = [name for name in entry["names"] if name not in arrays]
        if missing:
            raise UserError(f"{entry['file']}: no weight(s) {missing[:3]} that the library needs")
        return [self._to_device(np.ascontiguousarray(arrays[name])) for name in entry["names"]]

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        """The inputs as device tensors in the library's order, checked against the sidecar.

        Raises:
            UserError: A missing/unknown input, or a shape or dtype the library cannot take.
        """
        names = self.input_names
        missing = [n for n in names if n not in feeds]
        unknown = sorted(set(feeds) - set(names))
        if missing or unknown:
            raise UserError(
                f"inputs do not match the library: missing {missing}, unknown {unknown}"
            )
        args = []
        for spec in self._inputs:
            array = np.asarray(feeds[spec.name])
            if array.dtype.name != spec.dtype:
                raise UserError(
                    f"input '{spec.name}': dtype {array.dtype.name}, the library takes {spec.dtype}"
                )
            if not spec.accepts(array.shape):
                raise UserError(
                    f"input '{spec.name}': shape {list(array.shape)}, the library takes "
                    f"{spec.describe()}"
                )
            args.append(self._to_device(array))
        return args

    def call(self, args: Sequence[Any]) -> list[Any]:
        """Run on prepared inputs; the outputs stay on the device (for timing)."""
        try:
            result = self._main(*args, *self._weights)
        except Exception as exc:
            raise RunFailed(f"the compiled model failed to run: {one_line(exc)}")
        values = [result] if isinstance(result, tvm_ffi.Tensor) else list(result)
        if len(values) != len(self._outputs):
            raise RunFailed(
                f"the compiled model returned {len(values)} value(s) for "
                f"{len(self._outputs)} output(s)"
            )
        return values

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` maps every input name to an array."""
        values = self.call(self.prepare(feeds))
        return {spec.name: self._to_host(v) for spec, v in zip(self._outputs, values)}

    def sync(self) -> None:
        """Wait for the device to finish what was launched."""
        tvm_ffi.get_global_func("runtime.Device_StreamSync")(self._device, 0)

    def _to_device(self, array: np.ndarray) -> Any:
        """On the CPU, read in place when 64-byte aligned (as onnxruntime does), else copy."""
        host = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        if host.ctypes.data % ALIGNMENT or not host.flags.writeable:  # DLPack needs both
            host = _aligned_copy(host)
        view = tvm_ffi.from_dlpack(host)
        if self._device.dlpack_device_type() == CPU:
            return view
        alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        tensor = alloc(tvm_ffi.Shape(host.shape), host.dtype.name, self._device, None)
        tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")(view, tensor)
        return tensor

    def _to_host(self, tensor: Any) -> np.ndarray:
        if tensor.device.dlpack_device_type() == CPU:
            return np.from_dlpack(tensor).copy()
        host = _aligned_copy(np.empty(tuple(tensor.shape), dtype=str(tensor.dtype)))
        tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")(tensor, tvm_ffi.from_dlpack(host))
        return host


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    raw = np.empty(array.nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def load(path: str | os.PathLike, *, threads: int | None = None) -> Library:
    """Load a compiled library with TVM's runtime only; its sidecar says the device.

    Args:
        path: The ``.so`` written by ``gconv-compile compile`` (its ``.so.json`` beside it).
        threads: CPU threads for TVM's pool (default: every core this process may use).

    Raises:
        UserError: Missing/mismatched sidecar, no runtime library, a CPU that cannot run the
            code, no GPU for a CUDA library, or a weights file that does not fit.
    """
    # Absolute: dlopen searches the library path, not the working folder, for a bare name.
    library = Path(path).absolute()
    info = read_sidecar(library)
    count = _prepare(info, threads, library)
    try:
        module = tvm_ffi.load_module(str(library))
    except Exception as exc:
        raise UserError(f"{library}: TVM's runtime cannot load it: {one_line(exc)}")
    return Library(library, info, module, count)


def open_module(
    module: Any, info: Mapping[str, Any], *, weights: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
) -> Library:  # fmt: skip
    """A :class:`Library` over a runtime module already in memory (a build's ``jit()``)."""
    count = _prepare(info, threads, None)
    return Library(None, dict(info), module, count, weights)


def _prepare(info: Mapping[str, Any], threads: int | None, library: Path | None) -> int:
    """Check the target can run here, load the runtime, size the pool; returns the threads."""
    label = library or "the library"
    kind = info["target"].get("kind")
    if kind not in ("llvm", "cuda"):
        raise UserError(f"{label}: target kind {kind!r} is not one this runtime can run")
    if kind == "llvm":
        reason = host_can_run(info["target"])
        if reason:
            raise UserError(f"{label}: cannot run here: {reason}")
    load_runtime(cuda=kind == "cuda")
    count = set_threads(threads)
    if kind == "cuda":
        _prepare_cuda(library, info)
    return count


def _prepare_cuda(library: Path | None, info: Mapping[str, Any]) -> None:
    try:
        count = int(tvm_ffi.get_global_func("runtime.GetCudaDeviceCount")())
    except Exception:  # no driver: the CUDA runtime cannot even count devices
        count = 0
    if not count:
        raise UserError(
            f"{library or 'the library'}: a CUDA library needs a GPU and none is visible"
        )
    entry = info.get("cuda_binary") or {}
    binaries = {}
    if entry.get("file") and not entry.get("embedded") and library is not None:
        binaries = read_cuda_binaries(library.parent / entry["file"])
    _register_cuda_compile(binaries, entry.get("arch") or info["target"].get("arch", "sm_90"))
