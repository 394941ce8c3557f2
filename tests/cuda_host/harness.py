"""Compile a TVM-generated CUDA kernel with g++ and the host header, run it over its grid.

``build(kernel)`` turns one ``cuda_kernels.Kernel`` into a shared library: the kernel's CUDA C
unchanged except for the ``__shared__`` declarations (``alignas`` moved in front, which C++
requires once ``__shared__`` means ``static``) and a launcher appended; ``include/cuda_host.h``
is force-included and stands in for ``cuda.h`` and ``cuda_fp16.h``. ``HostKernel.run`` calls it
with numpy arrays over the grid and block read from the lowered TIR, outputs filled with NaN
first.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gconv_compile.tvm_schedules.cuda_kernels import Kernel

INCLUDE = Path(__file__).parent / "include"
_SHARED = re.compile(r"__shared__\s+alignas\((\d+)\)\s+")
# dynamic shared memory: a fixed 64 KiB array in the same section (filled with NaN bytes too)
_DYNAMIC = re.compile(r"extern __shared__\s+__align__\((\d+)\)\s+(\w+)\s+(\w+)\[\];")
_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\((\d+)\)")
_CACHE = Path(tempfile.gettempdir()) / "gconv_cuda_host"

_LAUNCHER = """
#include <utility>
namespace {{
template <typename... A, std::size_t... I>
void cuda_host_call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {{
  kernel(static_cast<A>(args[I])...);
}}
struct CudaHostCall {{
  void** args;
  static void run(void* self) {{
    auto kernel = &{name};
    cuda_host_call(kernel, static_cast<CudaHostCall*>(self)->args,
                   std::make_index_sequence<{n_args}>{{}});
  }}
}};
}}  // namespace
extern "C" int cuda_host_run(void** args, const int* grid, const int* block, int order) {{
  CudaHostCall call{{args}};
  return cuda_host_launch(grid, block, order, &CudaHostCall::run, &call);
}}
"""


def compiler() -> str | None:
    return shutil.which("g++")


def host_source(kernel: Kernel, source: str | None = None) -> str:
    """The kernel's CUDA C as C++ for the host header, with the launcher appended."""
    text = _SHARED.sub(r"alignas(\1) CUDA_HOST_SHARED ", source or kernel.source)
    text = _DYNAMIC.sub(r"alignas(\1) CUDA_HOST_SHARED \2 \3[65536 / sizeof(\2)];", text)
    return text + _LAUNCHER.format(name=kernel.name, n_args=len(kernel.args))


@dataclass
class HostKernel:
    kernel: Kernel
    library: ctypes.CDLL

    def run(self, inputs: dict[str, np.ndarray], *, order: int = 0, grid=None) -> dict:
        """Launch over ``grid`` (the kernel's own by default); returns outputs by buffer name.

        Args:
            inputs: Graph input arrays by name (constants come with the kernel).
            order: 0 runs each barrier phase's threads first to last, 1 last to first.
        """
        arrays = []
        for arg in self.kernel.args:
            if arg.is_output:
                array = np.full(arg.shape, np.nan, dtype=arg.dtype)
            elif isinstance(arg.value, str):
                array = np.ascontiguousarray(inputs[arg.value.removeprefix("input:")])
            else:
                array = np.ascontiguousarray(arg.value)
            if array.dtype != np.dtype(arg.dtype) or array.shape != arg.shape:
                raise ValueError(f"{arg.name}: {array.dtype}{array.shape}, kernel wants "
                                 f"{arg.dtype}{arg.shape}")  # fmt: skip
            arrays.append(array)
        pointers = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        dims = ctypes.c_int * 3
        grid = dims(*(grid or self.kernel.grid))
        block = dims(*self.kernel.block)
        diverged = self.library.cuda_host_run(pointers, grid, block, order)
        if diverged < 0:
            raise RuntimeError(f"{self.kernel.name}: {-diverged} WMMA call(s) with a pointer not "
                               "32-byte aligned or an ldm not a multiple of 16 bytes")  # fmt: skip
        if diverged:
            raise RuntimeError(f"{self.kernel.name}: {diverged} block(s) reached a barrier after "
                               "some of their threads exited")  # fmt: skip
        return {a.buffer: arr for a, arr in zip(self.kernel.args, arrays) if a.is_output}


def build(kernel: Kernel, source: str | None = None) -> HostKernel:
    """Compile ``kernel`` (or ``source``, an edited copy of its CUDA C) for the CPU."""
    bound = _LAUNCH_BOUNDS.search(source or kernel.source)
    if bound and kernel.threads > int(bound.group(1)):
        raise ValueError(f"{kernel.name}: {kernel.threads} threads, __launch_bounds__ "
                         f"{bound.group(1)}")  # fmt: skip
    text = host_source(kernel, source)
    header = b"".join(path.read_bytes() for path in sorted(INCLUDE.iterdir()))
    digest = hashlib.sha256(text.encode() + header).hexdigest()[:20]
    _CACHE.mkdir(exist_ok=True)
    library = _CACHE / f"{kernel.name}-{digest}.so"
    if not library.exists():
        fd, staged = tempfile.mkstemp(suffix=".so", dir=_CACHE)  # concurrent runs share it
        os.close(fd)
        cpp = Path(staged).with_suffix(".cpp")
        cpp.write_text(text)
        command = [compiler() or "g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w",
                   "-I", str(INCLUDE), "-include", "cuda_host.h", "-o", staged, str(cpp)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            Path(staged).unlink(missing_ok=True)
            raise RuntimeError(f"g++ failed on {kernel.name}:\n{done.stderr[-4000:]}")
        Path(staged).replace(library)
        cpp.replace(library.with_suffix(".cpp"))  # kept beside the library, to read
    lib = ctypes.CDLL(str(library))
    lib.cuda_host_run.restype = ctypes.c_int
    return HostKernel(kernel, lib)
