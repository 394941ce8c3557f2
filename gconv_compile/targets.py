"""Target decisions, without TVM: which machine a target is, and which passes it gets.

- Target specs: :func:`target_spec` turns ``--target``/``--arch``/``--mcpu`` into the dict TVM
  takes; :func:`host_llvm_target` names this CPU from /proc/cpuinfo; :func:`host_can_run` says
  whether this machine can run code built for a spec.
- Which passes a target gets: :func:`passes_for_target` is the one place that decides, for
  ``optimize``, ``expand`` and ``compile`` alike (the CLI and the Python API both call it).
- The CUDA cost decision: :func:`choose_cuda_conv_forms` says which grouped convs become dense
  block-diagonal convs on a GPU.

The build (``gconv_compile.build``), the library loader (``gconv_compile.library``) and the
schedules (``gconv_compile.tvm_schedules``) all ask this module, so none imports another for
these answers. TVM is imported only inside the two functions that ask it about a GPU, so that
``optimize`` and ``expand`` never load it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from gconv_compile.errors import UserError
from gconv_compile.host import X86_MCPU_FLAGS, cpu_flags, host_can_run  # noqa: F401 - re-exported
from gconv_compile.passes import (
    MIXCONV_MODES,
    ExpandGroupedConv,
    FoldCost,
    FoldSliceBounds,
    FoldSplitConvConcat,
    LowerQOperatorToQDQ,
    ResolveConvTransposeOutputShape,
)
from gconv_compile.passes._common import const_array
from gconv_compile.passes.expand_grouped_conv import MODES
from gconv_compile.profiles import Profile, load_profile

TARGET_KINDS = ("llvm", "cuda")
# Only used for code generation: the CUDA C in a library is compiled for the GPU it runs on.
DEFAULT_CUDA_ARCH = "sm_80"
# "import": what TVM's ONNX importer needs on every build, optimised or not (see build.py).
COMMANDS = ("optimize", "expand", "compile", "import")


def host_llvm_target(mcpu: str | None = None) -> dict[str, str]:
    """The llvm target for this machine, without ``-mcpu=native`` (which TVM rejects).

    The CPU is named from /proc/cpuinfo flags: skylake-avx512, haswell or x86-64.
    """
    machine = platform.machine().lower()
    # MetaSchedule needs the core count in the target; the code itself runs on any count.
    cores = os.cpu_count() or 1
    if machine in ("x86_64", "amd64"):
        if mcpu is None:
            flags = cpu_flags()
            mcpu = next(name for name, needs in X86_MCPU_FLAGS if needs <= flags)
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores}
    if machine in ("aarch64", "arm64"):
        return {
            "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu or "generic",
            "num-cores": cores,
        }  # fmt: skip
    spec = {"kind": "llvm", "num-cores": cores}
    if mcpu:
        spec["mcpu"] = mcpu
    return spec


def cuda_available() -> bool:
    """Whether TVM sees a CUDA GPU here."""
    import tvm  # here, not at the top: optimize/expand must not load TVM

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # no driver, no runtime library: no GPU for us
        return False


def gpu_arch() -> str | None:
    """The ``sm_XY`` of the GPU here, or None without one."""
    import tvm  # here, not at the top: optimize/expand must not load TVM

    if not cuda_available():
        return None
    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


def default_target_kind() -> str:
    return "cuda" if cuda_available() else "llvm"


def target_spec(kind: str, *, arch: str | None = None, mcpu: str | None = None) -> dict[str, Any]:
    """The TVM target dict for ``kind`` ("llvm" or "cuda")."""
    if kind not in TARGET_KINDS:
        raise UserError(f"--target '{kind}': expected one of {', '.join(TARGET_KINDS)}")
    if kind == "llvm":
        if arch:
            raise UserError("--arch applies to --target cuda only (use --mcpu for the CPU)")
        return host_llvm_target(mcpu)
    if arch is None:
        arch = gpu_arch() or DEFAULT_CUDA_ARCH
    if not re.fullmatch(r"sm_\d{2,3}[af]?", arch):
        raise UserError(f"--arch '{arch}': expected sm_XY, e.g. sm_80 or sm_90")
    return {"kind": "cuda", "arch": arch, "host": host_llvm_target(mcpu)}


# ------------------------------------------------------------------------------- passes


@dataclasses.dataclass
class PassPlan:
    """The passes one command runs for one target, in order; calling it runs them.

    Calling the plan on a model rewrites it in place and returns ``(rewrites, skips)``, the
    rewrite :func:`gconv_compile.pipeline.run_checked` checks. The passes' warnings (dense
    expansions that multiply the work) go to ``warnings``.

    Attributes:
        passes: Configured passes, or callables that build their passes from the model they
            see (the CUDA dense choice needs the folded model).
        target: The target profile's name (None without one).
        warnings: Receives the passes' warnings; a report passes its own list.
        conv_forms: The CUDA dense-vs-grouped decisions, filled when the plan runs.
    """

    passes: list[Any]
    target: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    conv_forms: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __call__(self, model: ir.Model) -> tuple[list, list]:
        rewrites: list = []
        skips: list = []
        for step in self.passes:
            built = [step] if isinstance(step, ir.passes.PassBase) else step(self, model)
            for graph_pass in built:
                graph_pass(model)
                rewrites.extend(graph_pass.rewrites)
                skips.extend(graph_pass.skips)
                self.warnings.extend(getattr(graph_pass, "warnings", ()))
        return rewrites, skips


def passes_for_target(
    command: str,
    target: str | os.PathLike | Profile | None = None,
    *,
    mode: str | None = None,
    keep_depthwise: bool = False,
    min_group: int | None = None,
    max_group: int | None = None,
    skip: Sequence[str] = (),
    warnings: list[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mixconv: str = "auto",
) -> PassPlan:
    """The passes ``command`` runs on a model for ``target``: the one place that decides.

    - ``optimize``: fold split-conv-concat blocks (unless the target's profile says not to),
      then expand the grouped convolutions the target cannot run.
    - ``expand``: expand grouped convolutions, all of them or those the target cannot run,
      narrowed by the options.
    - ``compile``: QOperator ops TVM cannot import are lowered to QDQ first (see ``import``),
      so that their blocks fold and the check covers the lowering; then ``target`` ("llvm" or
      "cuda") and its built-in profile decide as for ``optimize``; on cuda, grouped convs
      with few wide groups become dense (:func:`choose_cuda_conv_forms`); last, Slice bounds
      computed from static dims are made constant (TVM cannot lower a Concat of slices whose
      shapes it cannot see).
    - ``import``: what TVM's ONNX importer needs before every build, optimised or not: a
      ConvTranspose's ``output_shape`` (which TVM 0.27 ignores) becomes explicit pads, with
      ``input_shapes`` (the user's ``--shape``) binding symbolic input sizes; then QOperator
      ops TVM 0.27 cannot import (``QLinearConv``, ``ConvInteger``, com.microsoft
      ``QLinearAdd``/``QLinearConcat``/``QLinearAveragePool``...) become DequantizeLinear ->
      float op -> QuantizeLinear (already done by ``compile``'s plan unless ``--no-optimize``).

    ``mixconv`` (``--mixconv``) decides the folds that add work, MixConv blocks whose kernels
    are embedded in the largest: ``"auto"`` folds one when the cost estimate, priced by the
    target profile's ``fold_*`` fields (no target: onnxruntime's CPU), says it is not slower;
    ``"always"`` and ``"never"`` do what they say.

    Raises:
        UserError: An unknown mode or mixconv mode, an empty group range or a bad target
            profile.
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    if mixconv not in MIXCONV_MODES:
        raise UserError(f"--mixconv must be one of {', '.join(MIXCONV_MODES)}, got '{mixconv}'")
    if command == "import":
        resolve = ResolveConvTransposeOutputShape(input_shapes=input_shapes)
        return PassPlan([resolve, LowerQOperatorToQDQ()], target)
    profile = load_profile(target) if target is not None else None
    plan = PassPlan([], profile.name if profile else None)
    if warnings is not None:
        plan.warnings = warnings
    expand = _expand_passes(
        mode=mode, keep_depthwise=keep_depthwise, min_group=min_group, max_group=max_group,
        skip=skip, target=profile,
    )  # fmt: skip
    if command == "compile":
        # TVM reads QDQ only; lowered first, QOperator blocks fold like QDQ ones, and the
        # lowering is checked in onnxruntime and listed in the compile report.
        plan.passes.append(LowerQOperatorToQDQ())
    if command != "expand" and (profile is None or profile.fold):
        cost = profile.fold_cost_model() if profile is not None else FoldCost()
        plan.passes.append(FoldSplitConvConcat(mixconv=mixconv, cost=cost))
    if command == "expand" or profile is not None:
        plan.passes.extend(expand)
    if command == "expand" and profile is not None and not expand:
        plan.warnings.append(
            f"target '{profile.name}' runs every grouped convolution; nothing to expand"
        )
    if command == "compile":
        if target == "cuda":
            plan.passes.append(_cuda_dense_passes)
        plan.passes.append(FoldSliceBounds())
    return plan


def _expand_passes(
    *,
    mode: str | None = None,
    keep_depthwise: bool = False,
    min_group: int | None = None,
    max_group: int | None = None,
    skip: Sequence[str] = (),
    target: Profile | None = None,
) -> list[ExpandGroupedConv]:
    """The expand passes for these options: one pass, or those a target profile asks for.

    With a ``target``, only the convolutions it cannot run are expanded, by its preferred
    expansion unless ``mode`` says otherwise; the other options narrow that further.

    Raises:
        UserError: An unknown mode or an empty group range.
    """
    if mode is not None and mode not in MODES:
        raise UserError(f"expansion mode must be one of {', '.join(MODES)}, got '{mode}'")
    for label, value in (("--min-group", min_group), ("--max-group", max_group)):
        if value is not None and value < 2:
            raise UserError(f"{label} must be at least 2 (group 1 is not grouped), got {value}")
    if min_group is not None and max_group is not None and min_group > max_group:
        raise UserError(f"--min-group {min_group} is above --max-group {max_group}")
    if target is None:
        options = [{"mode": mode or "split", "keep_depthwise": keep_depthwise}]
    else:
        options = target.expand_options(mode)
        for option in options:
            option["keep_depthwise"] = option["keep_depthwise"] or keep_depthwise
    return [
        ExpandGroupedConv(**option, min_group=min_group, max_group=max_group, skip=skip)
        for option in options
    ]


def _cuda_dense_passes(plan: PassPlan, model: ir.Model) -> list[ExpandGroupedConv]:
    """The dense expansion of the grouped convs :func:`choose_cuda_conv_forms` makes dense.

    The decision is made on the model as the passes before left it (folded), and passed to
    the expand pass as its ``select`` predicate; no pass runs when no conv goes dense.
    """
    forms = choose_cuda_conv_forms(model)
    plan.conv_forms.extend(forms)
    why = {f["node"]: f["why"] for f in forms}
    dense = {f["node"] for f in forms if f["form"] == "dense-blockdiag"}
    if not dense:
        return []

    def select(conv: ir.Node, geometry) -> str | None:
        if conv.name in dense:
            return None
        if conv.name in why:
            return f"grouped kernel kept: {why[conv.name]}"
        return "grouped kernel kept: dense pays only for 2-4 wide groups"

    return [ExpandGroupedConv(mode="dense", op_types=("Conv",), select=select)]


# ------------------------------------------------------------------------------- CUDA forms

# Peak dense rates of an H100 SXM in TFLOP/s, the GPU issue #5 targets. Only their ratio decides:
# TVM 0.27 generates no TF32, so float32 convs never reach tensor cores, while float16 dense
# convs do through dlight's Matmul rule, and float16 grouped convs through our tensor-core kernel
# where ``cuda_plan`` finds it a tile (then dense is never cheaper). These are datasheet numbers,
# not measurements: no GPU was available when this estimate was written.
CUDA_CORE_TFLOPS = {"float32": 67.0, "float16": 134.0, "bfloat16": 134.0}
CUDA_TENSOR_CORE_TFLOPS = {"float16": 989.0, "bfloat16": 989.0}
# Below this many input channels per group a dense block-diagonal GEMM is mostly zero-padding of
# tensor-core tiles and launch overhead; the grouped kernel stays.
WIDE_GROUP_CHANNELS = 64


def choose_cuda_conv_forms(model: ir.Model) -> list[dict[str, Any]]:
    """For each grouped Conv with 2-4 wide groups: grouped kernel or dense block-diagonal conv.

    A float16 conv whose output shape is static and that ``cuda_plan`` puts on tensor cores
    stays grouped (``grouped-tensorcore``: the dense form would do ``group`` times its MACs on
    the same tensor cores). Otherwise the dense form does ``group`` times the multiply-adds but
    runs on tensor cores where the element type has them; the estimate compares
    ``group / tensor-core rate`` with ``1 / CUDA-core rate`` and picks the cheaper.
    """
    forms = []
    for graph in model.graphs():
        for node in graph:
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            group_attr = node.attributes.get("group")
            group = group_attr.as_int() if group_attr is not None else 1
            weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if not 2 <= group <= 4 or weight is None or weight.shape[1] == 1:
                continue  # depthwise (one in-channel per group) has its own schedule
            pixels = _static_pixels(node.outputs[0])
            forms.append({"node": node.name, "group": group,
                          **_cuda_form(group, weight, pixels)})  # fmt: skip
    return forms


def _static_pixels(value: ir.Value) -> int | None:
    """N x H x W of a conv's output when its shape is known and static."""
    shape = value.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        return None
    return shape[0] * shape[2] * shape[3]


def _cuda_form(group: int, weight, pixels: int | None = None) -> dict[str, Any]:
    dtype = weight.dtype.name
    per_group_in = weight.shape[1]
    if dtype == "float16" and pixels:
        from .cuda_plan import plan

        taps = int(weight.shape[2] * weight.shape[3])
        grouped = plan(group, weight.shape[0] // group, per_group_in, taps, pixels)
        if grouped.chosen:  # the same tensor cores, 1/group of the dense form's padding
            why = (f"group {group}, {dtype}: the grouped conv runs on {grouped.describe()}; "
                   f"dense would do {group}x its MACs on the same tensor cores")  # fmt: skip
            return {"dtype": dtype, "form": "grouped-tensorcore", "why": why}
    grouped_rate = CUDA_CORE_TFLOPS.get(dtype, CUDA_CORE_TFLOPS["float32"])
    dense_rate = CUDA_TENSOR_CORE_TFLOPS.get(dtype, grouped_rate)
    ratio = (group / dense_rate) / (1 / grouped_rate)  # dense time / grouped time
    dense = ratio < 1 and per_group_in >= WIDE_GROUP_CHANNELS
    why = (
        f"group {group}, {per_group_in} in-channels per group, {dtype}: dense does "
        f"{group}x the MACs at {dense_rate:g} TFLOP/s peak vs grouped at "
        f"{grouped_rate:g}, estimated {ratio:.2f}x the grouped time"
    )
    if ratio < 1 and not dense:
        why += f"; groups narrower than {WIDE_GROUP_CHANNELS} channels stay grouped"
    return {"dtype": dtype, "form": "dense-blockdiag" if dense else "grouped-igemm", "why": why}
