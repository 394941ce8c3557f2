"""The CUDA kernels our schedules make for a model's convs: source, launch shape, arguments.

For tools that look at or run the kernels without a GPU (the CPU execution test, the static
review in ``benchmarks/cuda_static.py``): the model goes through the same ``legalize_and_fuse``
and ``schedule_module`` steps as a CUDA build, then each function our CUDA schedules took is
lowered with TVM's default TIR pipeline and put through TVM's CUDA code generator. The launch
shape comes from the ``thread_extent`` attributes of the lowered device function (what TVM's
host code passes to ``cuLaunchKernel``), and each kernel argument is tied to the PrimFunc
parameter and the Relax value (graph input or constant) the model passes there.

Code generation only: the CUDA compile callback is swapped for one that returns nothing while
a kernel is generated, so no nvcc/NVRTC run happens here.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx
from tvm.target import Target

_LAUNCH_AXES = ("blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "threadIdx.y",
                "threadIdx.z")  # fmt: skip
_LAUNCH_THREAD = re.compile(r'launch_thread\("(\w+\.[xyz])", (?:T\.int64\()?(\d+)')


@dataclass
class KernelArg:
    """One pointer argument of a kernel, in the kernel's order."""

    name: str  # the kernel's parameter name (TVM appends _ptr)
    buffer: str  # the PrimFunc buffer it points to
    dtype: str
    shape: tuple[int, ...]
    is_output: bool
    value: object = None  # 'input:<name>' for a graph input, else a numpy array (a constant)


@dataclass
class Kernel:
    """One CUDA kernel of a scheduled conv function."""

    function: str  # the Relax PrimFunc it comes from
    name: str  # the __global__ function's name
    schedule: str  # 'cuda-grouped-igemm', 'cuda-depthwise-spatial'
    detail: str  # the schedule's decision line
    source: str  # the whole CUDA C translation unit TVM generated for this function
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: list[KernelArg] = field(default_factory=list)
    fmas_per_thread: int = 0  # what the schedule says (its "gconv.fmas_per_thread"), 0: unknown
    macs: int = 0  # the conv's multiply-adds when the weights are repacked ("gconv.macs"), 0: none

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def cuda_target(arch: str = "sm_90") -> Target:
    return Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def conv_kernels(model, arch: str = "sm_90", before: tuple = ()) -> list[Kernel]:
    """The kernels of every conv function our CUDA schedules took, in the module's order.

    Args:
        model: An ``onnx.ModelProto`` with static shapes.
        arch: The CUDA architecture (``sm_90``).
        before: Relax passes to run before ``legalize_and_fuse`` (to review a pipeline change).
    """
    from tvm.relax.frontend.onnx import from_onnx

    from . import legalize_and_fuse, schedule_module

    target = cuda_target(arch)
    mod = from_onnx(model, keep_params_in_input=False)
    with target:
        mod = tvm.transform.Sequential([*before, *legalize_and_fuse(target)])(mod)
    mod, decisions = schedule_module(mod, target)
    calls = _call_arguments(mod)
    kernels = []
    for decision in decisions:
        if not decision.schedule.startswith("cuda-"):
            continue
        func = mod[decision.function]
        for kernel in _generate(func, decision.function, target):
            kernel.schedule, kernel.detail = decision.schedule, decision.detail
            if func.attrs is not None and "gconv.fmas_per_thread" in func.attrs:
                kernel.fmas_per_thread = int(func.attrs["gconv.fmas_per_thread"])
            if func.attrs is not None and "gconv.macs" in func.attrs:
                kernel.macs = int(func.attrs["gconv.macs"])
            _bind_arguments(kernel, func, calls.get(decision.function))
            kernels.append(kernel)
    return kernels


@contextlib.contextmanager
def _codegen_only():
    """Swap TVM's CUDA compile callback for one that compiles nothing (source only)."""
    name = "tvm_callback_cuda_compile"
    original = tvm.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, lambda *_: b"", override=True)
    try:
        yield
    finally:
        if original is not None:
            tvm_ffi.register_global_func(name, original, override=True)


def _generate(func: tirx.PrimFunc, name: str, target: Target) -> list[Kernel]:
    from tvm.tirx.build import split_host_device_mods

    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    mod = tirx.transform.BindTarget(target.with_host(target.host))(mod)
    pipeline, _, finalize_device = tirx.get_default_tir_pipeline(target)
    _, devices = split_host_device_mods(pipeline(mod))
    kernels = []
    for device_target, device_mod in devices.items():
        device_mod = finalize_device()(device_mod)
        with _codegen_only():
            source = tvm.get_global_func("target.build.cuda")(device_mod, device_target)
        text = source.inspect_source()
        for gv, kernel_func in device_mod.functions_items():
            extents = _thread_extents(kernel_func)
            grid = tuple(extents.get(axis, 1) for axis in _LAUNCH_AXES[:3])
            block = tuple(extents.get(axis, 1) for axis in _LAUNCH_AXES[3:])
            kernel = Kernel(name, str(gv.name_hint), "", "", text, grid, block)
            kernel.args = [
                KernelArg(str(p.name), str(p.name).removesuffix("_ptr"), "", (), False)
                for p in kernel_func.params
            ]
            kernels.append(kernel)
    return kernels


def _thread_extents(func: tirx.PrimFunc) -> dict[str, int]:
    """Each launch axis's extent, from the ``launch_thread`` statements of the device function
    (TVM 0.27 exports no TIR visitor to Python; the printed TIR names every one)."""
    extents: dict[str, int] = {}
    for tag, value in _LAUNCH_THREAD.findall(func.script()):
        if extents.setdefault(tag, int(value)) != int(value):
            raise ValueError(f"{tag} launched with extents {extents[tag]} and {value}")
    declared = [str(t) for t in func.attrs["tirx.kernel_launch_params"]]
    missing = [t for t in declared if t in _LAUNCH_AXES and t not in extents]
    if missing:
        raise ValueError(f"no constant extent for {missing} in the kernel")
    return extents


def _call_arguments(mod: tvm.IRModule) -> dict[str, list]:
    """PrimFunc name -> the argument list of its (single) call_tir in the Relax functions."""
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    found: dict[str, list] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            found.setdefault(str(expr.args[0].name_hint), list(expr.args[1].fields))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return found


def _bind_arguments(kernel: Kernel, func: tirx.PrimFunc, call_args: list | None) -> None:
    """Fill each kernel argument's dtype, shape, direction and (for inputs) value."""
    from tvm import relax

    buffers = {str(p.name): (i, p.ty) for i, p in enumerate(func.params)}
    n_inputs = len(call_args) if call_args is not None else len(func.params) - 1
    for arg in kernel.args:
        if arg.buffer not in buffers:
            raise ValueError(f"{kernel.name}: argument {arg.name} is not a buffer of {func}")
        index, buffer = buffers[arg.buffer]
        arg.dtype = str(buffer.dtype)
        arg.shape = tuple(int(d) for d in buffer.shape)
        arg.is_output = index >= n_inputs
        if arg.is_output or call_args is None:
            continue
        value = call_args[index]
        if isinstance(value, tvm.ir.expr.Constant):
            arg.value = np.ascontiguousarray(value.value.numpy())
        elif isinstance(value, relax.Var):
            arg.value = f"input:{value.name}"
        else:
            raise ValueError(f"{kernel.function}: argument {index} is neither a graph input nor a "
                             "constant")  # fmt: skip
