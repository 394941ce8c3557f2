"""Compile ONNX models with TVM Relax, and load and run the libraries it writes.

Every TVM call in the product lives in this module. The flow::

    IN.onnx --load/validate--> onnx-ir model --fold (checked in onnxruntime)--> ModelProto
        --tvm.relax.frontend.onnx.from_onnx--> Relax IRModule (symbolic dims stay symbolic)
        --tvm.compile(target)--> Executable --export_library--> OUT.so + OUT.so.json

``OUT.so.json`` (the sidecar) records what the library computes: the input and output names,
shapes and dtypes, the target, and the sha256 of the model it was compiled from and of the
library itself. :func:`load_library` refuses a library whose sidecar is missing or describes
another file, so ``verify`` can tell when a library belongs to a different model.

A CUDA library holds CUDA C, not machine code: TVM compiles it when the library is loaded. So a
CUDA build needs no GPU, but the machine that *runs* it needs what :data:`CUDA_RUNTIME_NEEDS`
says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from gconv_compile import __version__
from gconv_compile.errors import GconvError, UserError
from gconv_compile.model_io import LoadedModel, check_output_path, count_nodes, load_model
from gconv_compile.passes.expand_grouped_conv import ExpandGroupedConv
from gconv_compile.passes.fold_slice_bounds import FoldSliceBounds
from gconv_compile.report import Report
from gconv_compile.targets import host_can_run, host_llvm_target

logger = logging.getLogger(__name__)

TARGET_KINDS = ("llvm", "cuda")
# Only used for code generation: the CUDA C in a library is compiled for the GPU it runs on.
DEFAULT_CUDA_ARCH = "sm_80"
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


def cuda_available() -> bool:
    """Whether TVM sees a CUDA GPU here."""
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # no driver, no runtime library: no GPU for us
        return False


def tvm_version() -> str:
    import tvm

    return tvm.__version__


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
        arch = _gpu_arch() or DEFAULT_CUDA_ARCH
    if not re.fullmatch(r"sm_\d{2,3}[af]?", arch):
        raise UserError(f"--arch '{arch}': expected sm_XY, e.g. sm_80 or sm_90")
    return {"kind": "cuda", "arch": arch, "host": host_llvm_target(mcpu)}


def _gpu_arch() -> str | None:
    import tvm

    if not cuda_available():
        return None
    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


def _tvm_target(spec: Mapping[str, Any]):
    import tvm

    spec = dict(spec)
    host = spec.pop("host", None)
    return tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)


def optimization_for_target(
    kind: str, forms_out: list[dict[str, Any]] | None = None
) -> Callable[[ir.Model], tuple[list, list]] | None:
    """The rewrite the target's profile asks for before TVM sees the model (None: nothing).

    The llvm and cuda profiles fold split-conv-concat blocks and run every grouped convolution
    natively, so this is the fold; a profile that also expands goes through the pipeline's
    ``retarget``. On cuda, grouped convs with few, wide groups may become dense block-diagonal
    convs (:func:`choose_cuda_conv_forms`); ``forms_out`` receives those decisions.
    """
    from gconv_compile import pipeline
    from gconv_compile.profiles import load_profile

    profile = load_profile(kind)
    if not profile.expand_options():
        retarget = pipeline.fold if profile.fold else None
    else:
        retarget = pipeline.retarget(profile)

    def rewrite(model: ir.Model) -> tuple[list, list]:
        rewrites, skips = retarget(model) if retarget is not None else ([], [])
        if kind == "cuda":
            forms = choose_cuda_conv_forms(model)
            if forms_out is not None:
                forms_out.extend(forms)
            dense = {f["node"] for f in forms if f["form"] == "dense-blockdiag"}
            if dense:
                others = {f["node"] for f in forms} - dense
                expand = ExpandGroupedConv(mode="dense", skip=others, op_types=("Conv",))
                expand(model)
                rewrites, skips = rewrites + expand.rewrites, skips + expand.skips
        # Slice bounds computed from static dims (torch.chunk's TorchScript export) are made
        # constant: TVM cannot lower a Concat of slices whose shapes it cannot see.
        bounds = FoldSliceBounds()
        bounds(model)
        return rewrites + bounds.rewrites, skips + bounds.skips

    return rewrite


# Peak dense rates of an H100 SXM in TFLOP/s, the GPU issue #5 targets. Only their ratio decides:
# TVM 0.27 generates no TF32, so float32 convs never reach tensor cores, while float16 dense
# convs do through dlight's Matmul rule and our grouped kernels stay on the CUDA cores. These are
# datasheet numbers, not measurements: no GPU was available when this estimate was written.
CUDA_CORE_TFLOPS = {"float32": 67.0, "float16": 134.0, "bfloat16": 134.0}
CUDA_TENSOR_CORE_TFLOPS = {"float16": 989.0, "bfloat16": 989.0}
# Below this many input channels per group a dense block-diagonal GEMM is mostly zero-padding of
# tensor-core tiles and launch overhead; the grouped kernel stays.
WIDE_GROUP_CHANNELS = 64


def choose_cuda_conv_forms(model: ir.Model) -> list[dict[str, Any]]:
    """For each grouped Conv with 2-4 wide groups: grouped kernel or dense block-diagonal conv.

    The dense form does ``group`` times the multiply-adds but runs on tensor cores where the
    element type has them; the estimate compares ``group / tensor-core rate`` with
    ``1 / CUDA-core rate`` and picks the cheaper.
    """
    from gconv_compile.passes._common import const_array

    forms = []
    for graph in model.graphs():
        for node in graph:
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            group_attr = node.attributes.get("group")
            group = group_attr.as_int() if group_attr is not None else 1
            weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if not 2 <= group <= 4 or weight is None:
                continue
            dtype = weight.dtype.name
            per_group_in = weight.shape[1]
            if per_group_in == 1:
                continue  # depthwise: its own schedule
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
            forms.append(
                {"node": node.name, "group": group, "dtype": dtype,
                 "form": "dense-blockdiag" if dense else "grouped-igemm", "why": why}
            )  # fmt: skip
    return forms


# ------------------------------------------------------------------------------- metadata


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


# ------------------------------------------------------------------------------- compile


@dataclasses.dataclass
class CompiledModel:
    """The result of :func:`compile`: a TVM executable, what it computes, and the report.

    Attributes:
        executable: The ``tvm.runtime.Executable``.
        info: Inputs, outputs, target and fingerprints (also written as the sidecar).
        report: Rewrites, the check of the rewrite, timings (``report.extra["timings"]``).
        library: The exported library, or None when compiled in memory only.
        sources: Files written by ``emit_source``.
    """

    executable: Any
    info: LibraryInfo
    report: Report
    library: Path | None = None
    sources: list[Path] = dataclasses.field(default_factory=list)

    @property
    def timings(self) -> dict[str, float]:
        return self.report.extra.get("timings", {})

    def runner(self) -> Runner:
        """A VM over the in-memory executable, on the device of its target."""
        return Runner(self.executable, self.info)


def compile(  # noqa: A001 - the public name the API promises
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    target: str = "llvm",
    *,
    output: str | os.PathLike | None = None,
    arch: str | None = None,
    mcpu: str | None = None,
    optimize: bool = True,
    check: bool = True,
    seeds: Sequence[int] = (0, 1, 2),
    shapes: Mapping[str, Sequence[int]] | None = None,
    emit_source: str | os.PathLike | None = None,
    tune_trials: int = 0,
    tune_db: str | os.PathLike | None = None,
    tune_progress: Callable[[int, int, float | None], None] | None = None,
) -> CompiledModel:
    """Optimise ``model`` for ``target``, build it with TVM Relax, and optionally export it.

    Args:
        model: A path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (none is modified).
        target: "llvm" (this CPU) or "cuda" (builds without a GPU).
        output: Write the library here (``.so``) and its sidecar beside it (``.so.json``).
        arch: CUDA architecture for code generation, e.g. "sm_90" (default: the GPU here,
            else sm_80; the CUDA C is compiled for the actual GPU at load time).
        mcpu: llvm CPU name (default: detected from /proc/cpuinfo).
        optimize: Run the rewrite the target asks for (fold split-conv-concat blocks).
        check: Check the rewrite against the input model in onnxruntime.
        seeds: Seeds of the random inputs of that check.
        shapes: Bind these inputs to these shapes in the build (other symbolic dims stay
            symbolic) and in the check.
        emit_source: Folder to write the generated code to (``.cu`` for cuda, ``.ll`` and
            ``.s`` for llvm).
        tune_trials: MetaSchedule measurements to spend before the build (0: none). Needs
            ``tune_db``; tasks that already have records there are not tuned again.
        tune_db: Tuning-record folder: records found there are applied to the build.
        tune_progress: Called as ``tune_progress(done, total, eta_seconds_or_None)``.

    Returns:
        The compiled model; ``.runner()`` runs it in this process.

    Raises:
        UserError: Bad model, option or output path; TVM cannot import or build the model.
        CheckFailed: The rewritten model does not match the input (nothing is written).
    """
    import tvm

    spec = target_spec(target, arch=arch, mcpu=mcpu)
    loaded = load_model(model)
    if isinstance(model, ir.Model):
        # The fold rewrites in place; the caller's model stays as it was.
        loaded = LoadedModel(
            ir.serde.deserialize_model(ir.serde.serialize_model(model)), None, loaded.external_files
        )
    out_path = None
    if output is not None:
        out_path = check_output_path(output, loaded)
        if out_path.suffix != ".so":
            raise UserError(f"{out_path}: the library name must end in .so")
        check_output_path(sidecar_path(out_path), loaded)
    source_dir = _check_source_dir(emit_source) if emit_source is not None else None
    if tune_trials < 0:
        raise UserError("--tune-trials must be 0 or more")
    if tune_trials and tune_db is None:
        raise UserError("--tune-trials needs --tune-db DIR to keep the tuning records in")
    if tune_db is not None and Path(tune_db).exists() and not Path(tune_db).is_dir():
        raise UserError(f"--tune-db {tune_db}: not a folder")
    shapes = {name: list(dims) for name, dims in (shapes or {}).items()}
    _check_shape_names(loaded.model, shapes)

    fingerprint = model_fingerprint(loaded)
    report = Report("compile", input=str(loaded.path) if loaded.path else None, target=spec["kind"])
    timings: dict[str, float] = {}
    report.extra["timings"] = timings
    conv_forms: list[dict[str, Any]] = []
    rewrite = optimization_for_target(spec["kind"], conv_forms) if optimize else None
    started = time.perf_counter()
    if rewrite is None:
        report.nodes_before = report.nodes_after = count_nodes(loaded.model)
        report.check_note = "not optimised (--no-optimize)"
    else:
        from gconv_compile.pipeline import run_checked

        run_checked(loaded, rewrite, report, check=check, seeds=seeds, shapes=shapes or None)
    timings["optimize_s"] = time.perf_counter() - started

    model_ir = loaded.model
    inputs = [TensorSpec.from_value(v) for v in model_ir.graph.inputs if not v.is_initializer()]
    for spec_in in inputs:
        if spec_in.name in shapes:
            spec_in.shape = list(shapes[spec_in.name])
    outputs = [TensorSpec.from_value(v) for v in model_ir.graph.outputs]

    started = time.perf_counter()
    mod = _import_relax(model_ir, shapes)
    timings["import_s"] = time.perf_counter() - started

    from gconv_compile import tvm_schedules

    tvm_target = _tvm_target(spec)
    if tune_trials:
        symbolic = [
            s.describe()
            for s in inputs
            if s.shape is None or not all(isinstance(d, int) for d in s.shape)
        ]
        if symbolic:
            raise UserError(
                "tuning needs static input shapes (MetaSchedule cannot tune symbolic ones): "
                f"bind {', '.join(symbolic)} with --shape NAME=DIMS"
            )
        started = time.perf_counter()
        with tvm_target:
            fused = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(tvm_target))(mod)
        summary = tvm_schedules.tune(
            fused, tvm_target, trials=tune_trials, db_dir=tune_db, progress=tune_progress
        )
        report.extra["tuning"] = {"db": str(tune_db), "summary": summary.line()}
        timings["tune_s"] = time.perf_counter() - started

    started = time.perf_counter()
    decisions: list = []
    pipeline = tvm_schedules.relax_pipeline(
        tvm_target, db_dir=str(tune_db) if tune_db is not None else None, decisions=decisions
    )
    try:
        with tvm.transform.PassContext(opt_level=3):
            executable = tvm.compile(mod, tvm_target, relax_pipeline=pipeline)
    except Exception as exc:
        raise UserError(f"TVM cannot build the model for {spec['kind']}: {_tvm_message(exc)}")
    timings["build_s"] = time.perf_counter() - started
    report.extra["schedules"] = [d.to_dict() for d in decisions]
    if spec["kind"] == "cuda":
        report.extra["conv_forms"] = conv_forms

    info = LibraryInfo(
        model_sha256=fingerprint,
        inputs=inputs,
        outputs=outputs,
        target=spec,
        optimized=rewrite is not None,
        rewrites=len(report.rewrites),
        model=str(loaded.path) if loaded.path else None,
        tvm_version=tvm.__version__,
    )
    compiled = CompiledModel(executable, info, report)
    if source_dir is not None:
        compiled.sources = _emit_source(executable, spec["kind"], source_dir, out_path)
        report.extra["sources"] = [str(p) for p in compiled.sources]
    if out_path is not None:
        started = time.perf_counter()
        _export(executable, info, out_path)
        timings["export_s"] = time.perf_counter() - started
        compiled.library = out_path
        report.output = str(out_path)
    report.extra["library"] = info.to_dict()
    return compiled


def _check_shape_names(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> None:
    names = {v.name for v in model.graph.inputs if not v.is_initializer()}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise UserError(f"--shape names unknown input(s) {unknown}; inputs are {sorted(names)}")
    for value in model.graph.inputs:
        dims = shapes.get(value.name)
        if dims is None or value.shape is None:
            continue
        if len(dims) != len(value.shape):
            raise UserError(
                f"--shape {value.name}: rank {len(dims)} given, the input has rank "
                f"{len(value.shape)}"
            )
        for dim, size in zip(value.shape, dims):
            if isinstance(dim, int) and dim != size:
                raise UserError(
                    f"--shape {value.name}: {'x'.join(map(str, dims))} conflicts with the "
                    f"static shape {list(value.shape)}"
                )


def _check_source_dir(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--emit-source {folder}: exists and is not a folder")
    parent = folder.parent if str(folder.parent) else Path(".")
    if not folder.exists() and not parent.is_dir():
        raise UserError(f"--emit-source {folder}: folder '{parent}' does not exist")
    return folder


def _import_relax(model: ir.Model, shapes: Mapping[str, Sequence[int]]):
    """ONNX -> Relax. Only the inputs the user bound get a shape; the rest stay symbolic."""
    from tvm.relax.frontend.onnx import from_onnx

    ir.external_data.load_to_model(model)  # TVM reads tensors from the proto, not from files
    proto = ir.serde.serialize_model(model)
    _resolve_conv_transpose_output_shape(proto, shapes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mod = from_onnx(proto, shape_dict=dict(shapes) or None)
        except Exception as exc:
            raise UserError(f"TVM's ONNX importer cannot convert the model: {_tvm_message(exc)}")
    for warning in caught:
        logger.info("TVM import: %s", str(warning.message).splitlines()[0])
    return mod


def _resolve_conv_transpose_output_shape(
    proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]
) -> None:
    """Turn ConvTranspose ``output_shape`` into explicit ``pads``/``output_padding``.

    TVM 0.27's importer ignores ``output_shape`` and silently returns the natural output size.
    The ONNX rule: total_padding = stride * (in - 1) + output_padding + (kernel - 1) * dilation
    + 1 - output_shape, split as auto_pad says (SAME_UPPER puts the larger half at the end);
    a negative total means the output is larger than the natural one, i.e. output_padding.
    Needs the input's spatial size, so it must be static (or bound with ``shapes``).
    """
    from onnx import helper

    targets = [
        node for node in proto.graph.node
        if node.op_type == "ConvTranspose" and any(a.name == "output_shape" for a in node.attribute)
    ]  # fmt: skip
    if not targets:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for value in probe.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
    except Exception:  # inference is best effort; unknown shapes are reported below
        inferred = probe.graph
    known: dict[str, list[int | None]] = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            known[value.name] = [
                d.dim_value if d.HasField("dim_value") else None
                for d in value.type.tensor_type.shape.dim
            ]
    for tensor in proto.graph.initializer:
        known[tensor.name] = list(tensor.dims)
    for node in targets:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x_shape, w_shape = known.get(node.input[0]), known.get(node.input[1])
        label = f"ConvTranspose '{node.name or node.output[0]}'"
        if not x_shape or not w_shape or any(d is None for d in x_shape[2:] + w_shape[2:]):
            raise UserError(
                f"{label} sets output_shape, which TVM ignores, and its input's spatial size is "
                "not static; bind it with --shape"
            )
        rank = len(x_shape) - 2
        kernel = list(attrs.get("kernel_shape", w_shape[2:]))
        strides = list(attrs.get("strides", [1] * rank))
        dilations = list(attrs.get("dilations", [1] * rank))
        output_padding = list(attrs.get("output_padding", [0] * rank))
        wanted = list(attrs["output_shape"])[-rank:]
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        begins, ends = [], []
        for i in range(rank):
            total = (
                strides[i] * (x_shape[2 + i] - 1) + output_padding[i]
                + (kernel[i] - 1) * dilations[i] + 1 - wanted[i]
            )  # fmt: skip
            if total < 0:
                output_padding[i] -= total
                total = 0
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        keep = [a for a in node.attribute if a.name not in ("output_shape", "auto_pad", "pads",
                                                            "output_padding")]  # fmt: skip
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.extend([
            helper.make_attribute("pads", begins + ends),
            helper.make_attribute("output_padding", output_padding),
        ])  # fmt: skip
        logger.info("%s: output_shape %s -> pads %s, output_padding %s", label, wanted,
                    begins + ends, output_padding)  # fmt: skip


def _tvm_message(exc: BaseException) -> str:
    """The line of a TVM error that says what went wrong (its text often starts with a trace)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    useful = [
        line for line in lines
        if not line.startswith(("Traceback", "File ", "File:", "at ", "[bt]", "#"))
        and not re.match(r"^\d+: ", line)
    ]  # fmt: skip
    text = (useful[0] if useful else (lines[0] if lines else type(exc).__name__))[:300]
    return f"{type(exc).__name__}: {text}"


def _modules(module) -> Iterator[Any]:
    yield module
    for child in module.imports:
        yield from _modules(child)


def _emit_source(executable, kind: str, folder: Path, out_path: Path | None) -> list[Path]:
    """Write the generated device code: CUDA C for cuda, LLVM IR and assembly for llvm."""
    stem = out_path.stem if out_path is not None else "model"
    files: dict[str, str] = {}
    for module in _modules(executable.mod):
        if kind == "cuda" and module.kind == "cuda":
            files[f"{stem}.cu"] = module.inspect_source()
        elif kind == "llvm" and module.kind == "llvm":
            files[f"{stem}.ll"] = module.inspect_source("ll")
            files[f"{stem}.s"] = module.inspect_source("asm")
    if not files:
        raise UserError(f"TVM produced no {kind} code to emit")
    folder.mkdir(exist_ok=True)
    written = []
    for name, text in files.items():
        written.append(_write_text_atomic(folder / name, text))
    return written


def _write_text_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=".gconv-tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a source file is for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _export(executable, info: LibraryInfo, out_path: Path) -> None:
    """Export the library and its sidecar through temporary files in the destination folder."""
    folder = out_path.parent if str(out_path.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=".gconv-tmp-", dir=folder))
    try:
        staged = staging / out_path.name
        try:
            executable.export_library(str(staged))
        except Exception as exc:
            raise UserError(f"{out_path}: TVM cannot export the library: {_tvm_message(exc)}")
        info.library_sha256 = file_sha256(staged)
        staged_sidecar = staging / sidecar_path(out_path).name
        staged_sidecar.write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        # The sidecar names the library's sha256, so a crash between the two moves is caught
        # at load time rather than pairing a library with the wrong description.
        os.replace(staged, out_path)
        os.replace(staged_sidecar, sidecar_path(out_path))
    except OSError as exc:
        raise UserError(f"{out_path}: cannot write: {exc.strerror or exc}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s and %s", out_path, sidecar_path(out_path))


# ------------------------------------------------------------------------------- run


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
    import tvm

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
        raise UserError(f"{library}: TVM cannot load it: {_tvm_message(exc)}{hint}")
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
            raise UserError(f"TVM cannot start the model's VM: {_tvm_message(exc)}")
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
            raise RunFailed(f"the compiled model failed to run: {_tvm_message(exc)}")
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


class _CallableModule(types.ModuleType):
    """Keeps ``gconv_compile.compile(model, target=...)`` working once this module is imported.

    Importing a submodule binds it as an attribute of its package, which hides the package's
    ``compile`` function of the same name; calling the module calls the function.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> CompiledModel:
        return compile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
