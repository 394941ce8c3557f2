"""Static review of a CUDA conv kernel without a GPU: ptxas resources, the SASS hot loop, bounds.

``review(kernel)`` compiles the kernel's CUDA C with nvcc the way TVM's nvcc path does (``-O3
--use_fast_math``, TVM's ptxas flags, ``-v``), reads registers, spills and shared memory from
ptxas, disassembles the cubin with cuobjdump and finds the hot loop: the innermost loop (a
backward branch) with the most FMA operations, or, when every FMA loop is unrolled, the code from
the first FMA to the last.
In that loop it counts instructions, FMAs (``FFMA``, ``HFMA2``, ``HMMA``...), shared-memory
loads and their bytes, barriers, conditional branches other than the loop's own back edge, and
predicated FMAs (guards turned into predicates).

Bounds, for one H200 (``H200``: 132 SMs, 1.98 GHz, 4.8 TB/s, 67 TFLOPS float32 on CUDA cores,
989 TFLOPS float16 on tensor cores):

- roofline: ``max(FLOPs / peak, minimum bytes / bandwidth)``, minimum bytes = every argument
  read or written once;
- tensor-core kernels (``cuda_tensorcore``): FLOPs and weight bytes are the conv's own
  (``gconv.macs``), not the padded block-diagonal GEMM's; the bound adds the tensor cores' own
  time for the padded work the busiest SM's MMAs do;
- static lower bound of this code: the busiest SM runs ``ceil(blocks / 132)`` blocks of whole
  warps; each thread does the FMAs its schedule says (``gconv.fmas_per_thread``: outputs per
  thread x its share of the reduction), i.e. that many passes
  through the hot loop divided by the loop's FMAs, each pass issuing the loop's instructions (4
  warp instructions per clock per SM) and reading its shared-memory bytes (128 bytes per clock
  per SM); the larger of the two, or the DRAM time if larger. No stalls, no bank conflicts, no
  launch overhead: a code whose bound is far from the roofline cannot get close on a GPU.

Tools: ``nvcc`` and ``ptxas`` from the CUDA toolkit (``CUDA_PATH``, else ``nvcc`` on PATH), and
``cuobjdump`` from the toolkit or the ``nvidia-cuda-cuobjdump`` wheel.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cuda_kernels import Kernel


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_hz: float
    dram_bytes_s: float
    peak_flops: dict
    issue_per_clk: int = 4  # warp instructions per clock per SM
    shared_bytes_per_clk: int = 128  # per SM


H200 = Gpu("H200", 132, 1.98e9, 4.8e12, {"float32": 67e12, "float16": 989e12})

# FMA operations per lane of one instruction (HMMA: m16n8k16 is 4096 FMAs over 32 lanes).
_FMA_OPS = {"FFMA": 1, "HFMA2": 2, "FFMA2": 2, "DFMA": 1, "HFMA": 1}
_MMA_OPS = {"HMMA.16816": 64, "HMMA.1688": 32, "HMMA.884": 16}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNCTION = re.compile(r"Function : (\S+)")
_WIDTH = re.compile(r"\.(U8|S8|U16|S16|64|128)\b")


@dataclass
class Ptxas:
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    stack_bytes: int


@dataclass
class Instr:
    address: int
    predicate: str
    opcode: str
    operands: str


@dataclass
class HotLoop:
    """Counts over the hot loop's instructions (static: one pass through the loop body)."""

    is_loop: bool
    instructions: int
    fma_instructions: int
    fma_ops: int  # FMA operations per lane
    shared_loads: int
    shared_load_bytes: int  # per lane
    barriers: int
    guard_branches: int  # conditional branches other than the back edge
    predicated_fmas: int
    mma_instructions: int = 0  # HMMA.16816 and kin (tensor cores)

    @property
    def shared_loads_per_fma(self) -> float:
        return self.shared_loads / max(self.fma_ops, 1)

    @property
    def fma_fraction(self) -> float:
        return self.fma_instructions / max(self.instructions, 1)


@dataclass
class Review:
    kernel: Kernel
    ptxas: Ptxas
    loop: HotLoop
    flops: int
    min_bytes: int
    roofline_s: float
    bound_s: float
    bound_by: str


def toolkit() -> dict[str, str] | None:
    """Paths of nvcc and cuobjdump, or None when either is missing."""
    root = os.environ.get("CUDA_PATH")
    nvcc = str(Path(root, "bin", "nvcc")) if root and Path(root, "bin", "nvcc").exists() else None
    nvcc = nvcc or shutil.which("nvcc")
    cuobjdump = shutil.which("cuobjdump") or (str(Path(root, "bin", "cuobjdump")) if root else None)
    if cuobjdump is None or not Path(cuobjdump).exists():
        try:
            import nvidia

            found = sorted(Path(next(iter(nvidia.__path__))).glob("*/bin/cuobjdump"))
            cuobjdump = str(found[0]) if found else None
        except ImportError:
            cuobjdump = None
    if nvcc is None or cuobjdump is None:
        return None
    return {"nvcc": nvcc, "cuobjdump": cuobjdump}


def compile_cubin(source: str, arch: str, folder: Path, tools: dict) -> tuple[Path, dict]:
    """nvcc with TVM's flags; returns the cubin and each kernel's ptxas resources by name."""
    from tvm.support.nvcc import _ptxas_option_flags

    cu, cubin = folder / "kernel.cu", folder / "kernel.cubin"
    cu.write_text(source)
    suffix = arch.removeprefix("sm_")
    command = [tools["nvcc"], "--cubin", "-O3", "-gencode", f"arch=compute_{suffix},code=sm_{suffix}",
               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
               "--expt-relaxed-constexpr", "--use_fast_math", "-w",
               f"--ptxas-options={','.join(_ptxas_option_flags())}", "-o", str(cubin), str(cu)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{done.stderr[-4000:]}")
    resources = {}
    for chunk in (done.stdout + done.stderr).split("Compiling entry function '")[1:]:
        name = chunk.split("'", 1)[0]

        def number(pattern: str, text: str = chunk) -> int:
            found = re.search(pattern, text)
            return int(found.group(1)) if found else 0

        resources[name] = Ptxas(
            registers=number(r"Used (\d+) registers"),
            spill_stores=number(r"(\d+) bytes spill stores"),
            spill_loads=number(r"(\d+) bytes spill loads"),
            shared_bytes=number(r"(\d+) bytes smem"),
            stack_bytes=number(r"(\d+) bytes stack frame"),
        )
    return cubin, resources


def disassemble(cubin: Path, tools: dict) -> dict[str, list[Instr]]:
    """SASS of every function in the cubin."""
    text = subprocess.run([tools["cuobjdump"], "-sass", str(cubin)], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    functions: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        header = _FUNCTION.search(line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        found = _SASS_LINE.search(line)
        if found and current is not None:
            address, predicate, opcode, operands = found.groups()
            current.append(Instr(int(address, 16), (predicate or "").strip(), opcode, operands))
    return functions


def _fma_ops(instr: Instr) -> int:
    base = instr.opcode.split(".")[0]
    if "-RZ, RZ" in instr.operands:  # HFMA2.MMA R, -RZ, RZ, c: how ptxas moves a constant
        return 0
    if base == "HMMA":
        return next((ops for key, ops in _MMA_OPS.items() if instr.opcode.startswith(key)), 32)
    return _FMA_OPS.get(base, 0)


def _load_bytes(instr: Instr) -> int:
    width = _WIDTH.search(instr.opcode)
    return {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}.get(
        width.group(1) if width else "", 4
    )


def _branch_target(instr: Instr) -> int | None:
    if instr.opcode.split(".")[0] != "BRA":
        return None
    found = re.search(r"0x([0-9a-f]+)", instr.operands)
    return int(found.group(1), 16) if found else None


def hot_loop(instrs: list[Instr]) -> HotLoop:
    """The innermost loop with the most FMA operations (first to last FMA when there is none)."""
    loops = []  # (start, end) of each backward branch's range
    for instr in instrs:
        target = _branch_target(instr)
        if target is not None and target < instr.address:  # BRA to itself ends the code
            loops.append((target, instr.address))
    innermost = [
        (s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e)
                                            for s2, e2 in loops)
    ]  # fmt: skip

    def body(span):
        return [i for i in instrs if span[0] <= i.address <= span[1]]

    def fma_ops(span) -> int:
        return sum(_fma_ops(i) for i in body(span))

    best = max(innermost, key=fma_ops, default=None)
    is_loop = best is not None and fma_ops(best) > 0
    if not is_loop:  # every FMA loop unrolled: the straight code from the first FMA to the last
        fmas = [i.address for i in instrs if _fma_ops(i)]
        best = (fmas[0], fmas[-1]) if fmas else None
    code = body(best) if best else []
    counted = [i for i in code if i.opcode != "NOP"]
    shared = [i for i in counted if i.opcode.split(".")[0] == "LDS"]
    fmas = [i for i in counted if _fma_ops(i)]
    back_edge = counted[-1] if is_loop and counted else None
    return HotLoop(
        is_loop=is_loop,
        instructions=len(counted),
        fma_instructions=len(fmas),
        fma_ops=sum(_fma_ops(i) for i in fmas),
        shared_loads=len(shared),
        shared_load_bytes=sum(_load_bytes(i) for i in shared),
        barriers=sum(i.opcode.startswith("BAR") for i in counted),
        guard_branches=sum(
            1 for i in counted if i.opcode.startswith("BRA") and i.predicate and i is not back_edge
        ),
        predicated_fmas=sum(1 for i in fmas if i.predicate and i.predicate != "@PT"),
        mma_instructions=sum(1 for i in fmas if i.opcode.startswith("HMMA")),
    )


def _tensor_macs_per_sm(gpu: Gpu) -> float:
    """Multiply-adds per second one SM's tensor cores do at the float16 peak."""
    return gpu.peak_flops["float16"] / 2 / gpu.sms


def tensor_clocks_per_mma(gpu: Gpu = H200) -> float:
    """Clocks one HMMA.16816 (16x8x16 multiply-adds) keeps a sub-partition's tensor core busy
    at the peak rate (4 sub-partitions per SM, each issuing one warp instruction per clock)."""
    return 16 * 8 * 16 / (_tensor_macs_per_sm(gpu) / gpu.clock_hz / 4)


def mma_issue_bound(loop: HotLoop, gpu: Gpu = H200) -> bool:
    """True when an MMA loop issues instructions slower than its tensor cores run them: more
    warp instructions per HMMA.16816 than the clocks each takes (4.3 on an H200)."""
    if not loop.mma_instructions:
        return False
    return loop.instructions / loop.mma_instructions > tensor_clocks_per_mma(gpu)


def _mma_share(sass: list[Instr]) -> float:
    """The part of the kernel's multiply-adds that MMAs do (0 for CUDA-core code)."""
    ops = [_fma_ops(i) for i in sass]
    mma = sum(o for i, o in zip(sass, ops) if i.opcode.startswith("HMMA") and o)
    return mma / max(sum(ops), 1)


def conv_work(kernel: Kernel) -> tuple[int, int, int]:
    """(FLOPs, minimum bytes, reduction length) of the conv kernel, from its arguments."""
    output = next(a for a in kernel.args if a.is_output)
    size = {"float32": 4, "float16": 2}
    if kernel.macs:  # weights repacked (tensor cores: block-diagonal, padded): the conv's own
        reduction = kernel.macs // math.prod(output.shape)
        packed = next(a for a in kernel.args if not a.is_output and len(a.shape) == 3)
        weights = output.shape[1] * reduction * size.get(packed.dtype, 4)
        others = [a for a in kernel.args if a is not packed]
        min_bytes = weights + sum(math.prod(a.shape) * size.get(a.dtype, 4) for a in others)
        return 2 * kernel.macs, min_bytes, reduction
    weight = next(a for a in kernel.args if not a.is_output and len(a.shape) == 4
                  and not isinstance(a.value, str))  # fmt: skip
    reduction = math.prod(weight.shape[1:])
    flops = 2 * math.prod(output.shape) * reduction
    min_bytes = sum(math.prod(a.shape) * size.get(a.dtype, 4) for a in kernel.args)
    return flops, min_bytes, reduction


def review(kernel: Kernel, arch: str = "sm_90", gpu: Gpu = H200, tools: dict | None = None):
    """Compile, disassemble and bound one kernel (see the module docstring)."""
    return review_many([kernel], arch, gpu, tools)[0]


def review_many(kernels: list[Kernel], arch: str = "sm_90", gpu: Gpu = H200,
                tools: dict | None = None) -> list[Review]:  # fmt: skip
    """``review`` for many kernels, with one nvcc run per distinct CUDA C preamble."""
    tools = tools or toolkit()
    if tools is None:
        raise RuntimeError("nvcc or cuobjdump not found (set CUDA_PATH; pip install "
                           "nvidia-cuda-cuobjdump)")  # fmt: skip
    units: dict[str, list[int]] = {}
    for index, kernel in enumerate(kernels):
        units.setdefault(kernel.source.split(_KERNELS_START, 1)[0], []).append(index)
    found: dict[int, tuple[Ptxas, list[Instr]]] = {}
    for preamble, indices in units.items():
        bodies = [_renamed(kernels[i], f"k{i}_") for i in indices]
        with tempfile.TemporaryDirectory(prefix="gconv-cuda-static-") as folder:
            cubin, resources = compile_cubin(
                preamble + "\n".join(bodies), arch, Path(folder), tools
            )
            sass = disassemble(cubin, tools)
        for i in indices:
            name = f"k{i}_{kernels[i].name}"
            found[i] = (resources[name], sass.get(name, []))
    return [_bound(kernel, *found[i], gpu) for i, kernel in enumerate(kernels)]


_KERNELS_START = 'extern "C" __global__'


def _renamed(kernel: Kernel, prefix: str) -> str:
    """The kernel's definitions (no preamble) with its name prefixed, to share a unit."""
    body = _KERNELS_START + kernel.source.split(_KERNELS_START, 1)[1]
    return re.sub(rf"\b{re.escape(kernel.name)}\b", prefix + kernel.name, body)


def _bound(kernel: Kernel, ptxas: Ptxas, sass: list[Instr], gpu: Gpu) -> Review:
    loop = hot_loop(sass)
    flops, min_bytes, reduction = conv_work(kernel)
    dtype = next(a.dtype for a in kernel.args if a.is_output)
    roofline = max(flops / gpu.peak_flops[dtype], min_bytes / gpu.dram_bytes_s)
    # per SM: the busiest one's blocks, whole warps (a 16-thread block still issues whole warps)
    lanes = math.ceil(kernel.blocks / gpu.sms) * math.ceil(kernel.threads / 32) * 32
    # a kernel that does not say: one output per thread
    fmas = kernel.fmas_per_thread or reduction
    fma_per_lane = fmas / max(loop.fma_ops, 1)
    issue_s = lanes / 32 * fma_per_lane * loop.instructions / gpu.issue_per_clk / gpu.clock_hz
    shared_s = (
        lanes * fma_per_lane * loop.shared_load_bytes / gpu.shared_bytes_per_clk / gpu.clock_hz
    )
    dram_s = min_bytes / gpu.dram_bytes_s
    # the tensor cores' own rate: every MAC the busiest SM's MMAs do (padding included)
    tensor_s = lanes * fmas * _mma_share(sass) / _tensor_macs_per_sm(gpu)
    bound, by = max((issue_s, "issue"), (shared_s, "shared"), (dram_s, "dram"),
                    (tensor_s, "tensor"))  # fmt: skip
    return Review(kernel, ptxas, loop, flops, min_bytes, roofline, bound, by)
