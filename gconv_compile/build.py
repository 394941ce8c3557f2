"""Building a model with TVM Relax: import, optimise, build, export, emit source.

The flow::

    IN.onnx --load/validate--> onnx-ir model --passes for the target (checked in onnxruntime)
        --tvm.relax.frontend.onnx.from_onnx--> Relax IRModule (symbolic dims stay symbolic)
        --[MetaSchedule tuning]--> tvm.compile(target, our schedules) --> Executable
        --export_library--> OUT.so + OUT.so.json (the sidecar, :mod:`gconv_compile.library`)

For cuda with nvcc here, the CUDA C that TVM generated is compiled for ``--arch`` and the fatbin
replaces it in the bytes ``export_library`` packs into OUT.so (:func:`_pack_imports`).

Which passes run is :func:`gconv_compile.targets.passes_for_target`'s decision; the check is
:func:`gconv_compile.pipeline.run_checked`'s. The package exports :func:`compile` as
``gconv_compile.compile``.

TVM and the schedules (which import TVM) are imported inside the functions that build, not at
the top, so that importing the package for ``optimize`` or ``expand`` never loads TVM.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from gconv_compile.errors import UserError, tvm_message
from gconv_compile.files import TMP_PREFIX, write_bytes_atomic, write_text_atomic
from gconv_compile.library import (
    LibraryInfo,
    Runner,
    TensorSpec,
    embed_cuda_binaries,
    file_sha256,
    model_fingerprint,
    sidecar_path,
)
from gconv_compile.model_io import LoadedModel, check_output_path, count_nodes, load_model
from gconv_compile.passes import ResolveConvTransposeOutputShape
from gconv_compile.pipeline import run_checked
from gconv_compile.reference import check_shape_names
from gconv_compile.report import Report
from gconv_compile.runtime import SAFETENSORS_DTYPES, find_nvcc, nvcc_compile
from gconv_compile.targets import passes_for_target, target_spec

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIXES = (".npz", ".safetensors")


@dataclasses.dataclass
class CompiledModel:
    """The result of :func:`compile`: a TVM executable, what it computes, and the report.

    Attributes:
        executable: The ``tvm.runtime.Executable``.
        info: Inputs, outputs, target and fingerprints (also written as the sidecar).
        report: Rewrites, the check of the rewrite, timings (``report.extra["timings"]``).
        library: The exported library, or None when compiled in memory only.
        sources: Files written by ``emit_source``.
        weights: The weights by ONNX name when they are kept outside the code (``weights_file``).
    """

    executable: Any
    info: LibraryInfo
    report: Report
    library: Path | None = None
    sources: list[Path] = dataclasses.field(default_factory=list)
    weights: dict[str, np.ndarray] | None = None

    @property
    def timings(self) -> dict[str, float]:
        return self.report.extra.get("timings", {})

    def runner(self) -> Runner:
        """A VM over the in-memory executable, on the device of its target."""
        return Runner.from_executable(self.executable, self.info, self.weights)


@dataclasses.dataclass
class _Request:
    """The checked options of one :func:`compile` call."""

    spec: dict[str, Any]
    loaded: LoadedModel
    out_path: Path | None
    source_dir: Path | None
    shapes: dict[str, list[int]]
    weights_path: Path | None = None


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
    weights_file: str | os.PathLike | None = None,
    mixconv: str = "auto",
) -> CompiledModel:
    """Optimise ``model`` for ``target``, build it with TVM Relax, and optionally export it.

    Args:
        model: A path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (none is modified).
        target: "llvm" (this CPU) or "cuda" (builds without a GPU).
        output: Write the library here (``.so``) and its sidecar beside it (``.so.json``).
        arch: CUDA architecture, e.g. "sm_90" (default: the GPU here, else sm_80). With
            nvcc here, the CUDA C is compiled for it into a fatbin embedded in the library.
        mcpu: llvm CPU name (default: detected from /proc/cpuinfo).
        optimize: Run the rewrite the target asks for (fold split-conv-concat blocks).
        check: Check the rewrite against the input model in onnxruntime.
        seeds: Seeds of the random inputs of that check.
        shapes: Bind these inputs' shapes in the build and the check (other dims stay symbolic).
        emit_source: Folder for the generated code (``.cu``; ``.ll`` and ``.s`` for llvm).
        tune_trials: MetaSchedule measurements to spend before the build (0: none). Needs
            ``tune_db``; tasks that already have records there are not tuned again.
        tune_db: Tuning-record folder: records found there are applied to the build.
        tune_progress: Called as ``tune_progress(done, total, eta_seconds_or_None)``.
        weights_file: Keep the weights in this ``.npz``/``.safetensors`` file beside ``output``.
        mixconv: MixConv folds: ``"auto"`` when the target's cost estimate says they are not
            slower, ``"always"`` or ``"never"``.

    Returns:
        The compiled model; ``.runner()`` runs it in this process.

    Raises:
        UserError: Bad model, option or output path; TVM cannot import or build the model.
        CheckFailed: The rewritten model does not match the input (nothing is written).
    """
    request = _check_request(
        model, target, output=output, arch=arch, mcpu=mcpu, emit_source=emit_source,
        tune_trials=tune_trials, tune_db=tune_db, shapes=shapes, weights_file=weights_file,
    )  # fmt: skip
    loaded, spec = request.loaded, request.spec
    fingerprint = model_fingerprint(loaded)
    report = Report("compile", input=str(loaded.path) if loaded.path else None, target=spec["kind"])
    timings: dict[str, float] = report.extra.setdefault("timings", {})
    started = time.perf_counter()
    conv_forms = _optimize(
        request, report, optimize=optimize, check=check, seeds=seeds, mixconv=mixconv
    )
    timings["optimize_s"] = time.perf_counter() - started

    inputs, outputs = _tensor_specs(loaded.model, request.shapes)
    started = time.perf_counter()
    mod = _import_relax(loaded.model, request.shapes, spec["kind"], bool(request.weights_path))
    mod, weights = _detach_weights(mod, loaded.model) if request.weights_path else (mod, None)
    timings["import_s"] = time.perf_counter() - started
    executable = _build(
        mod, spec, inputs, report, tune_trials=tune_trials, tune_db=tune_db,
        tune_progress=tune_progress,
    )  # fmt: skip
    if spec["kind"] == "cuda":
        report.extra["conv_forms"] = conv_forms
    info = LibraryInfo(
        model_sha256=fingerprint, inputs=inputs, outputs=outputs, target=spec,
        optimized=optimize, rewrites=len(report.rewrites),
        model=str(loaded.path) if loaded.path else None, tvm_version=tvm_version(),
    )  # fmt: skip
    compiled = CompiledModel(executable, info, report, weights=weights)
    return _write_outputs(compiled, request)


def _write_outputs(compiled: CompiledModel, request: _Request) -> CompiledModel:
    """Emit the source and export the library when asked; note both in the report."""
    report, out_path = compiled.report, request.out_path
    if request.source_dir is not None:
        kind = compiled.info.target_kind
        compiled.sources = _emit_source(compiled.executable, kind, request.source_dir, out_path)
        report.extra["sources"] = [str(p) for p in compiled.sources]
    if out_path is not None:
        started = time.perf_counter()
        if compiled.weights is not None:
            compiled.info.weights = _write_weights(request.weights_path, compiled.weights)
        binaries = None
        if compiled.info.target_kind == "cuda":
            binaries = _cuda_binaries(compiled, out_path)
        _export(compiled.executable, compiled.info, out_path, binaries)
        report.extra["timings"]["export_s"] = time.perf_counter() - started
        compiled.library = out_path
        report.output = str(out_path)
    report.extra["library"] = compiled.info.to_dict()
    return compiled


def _check_request(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    target: str,
    *,
    output: str | os.PathLike | None,
    arch: str | None,
    mcpu: str | None,
    emit_source: str | os.PathLike | None,
    tune_trials: int,
    tune_db: str | os.PathLike | None,
    shapes: Mapping[str, Sequence[int]] | None,
    weights_file: str | os.PathLike | None = None,
) -> _Request:
    """Everything that can be bad input, checked before the slow parts run."""
    spec = target_spec(target, arch=arch, mcpu=mcpu)
    loaded = load_model(model)
    if isinstance(model, ir.Model):
        # The passes rewrite in place; the caller's model stays as it was.
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
    bound = {name: list(dims) for name, dims in (shapes or {}).items()}
    check_shape_names(loaded.model, bound)
    weights_path = _check_weights_path(weights_file, out_path, loaded)
    return _Request(spec, loaded, out_path, source_dir, bound, weights_path)


def _check_weights_path(
    weights_file: str | os.PathLike | None, out_path: Path | None, loaded: LoadedModel
) -> Path | None:
    if weights_file is None:
        return None
    path = Path(weights_file)
    if out_path is None:
        raise UserError("--weights-file needs an output library (-o OUT.so) to sit beside")
    if path.suffix not in WEIGHTS_SUFFIXES:
        raise UserError(f"--weights-file {path}: the name must end in .npz or .safetensors")
    if path.resolve().parent != out_path.resolve().parent:
        raise UserError(
            f"--weights-file {path}: must be in the library's folder ({out_path.parent})"
        )
    return check_output_path(path, loaded)


def _optimize(
    request: _Request,
    report: Report,
    *,
    optimize: bool,
    check: bool,
    seeds: Sequence[int],
    mixconv: str = "auto",
) -> list[dict[str, Any]]:
    """Run the target's passes, checked; returns the CUDA conv-form decisions."""
    if not optimize:
        report.nodes_before = report.nodes_after = count_nodes(request.loaded.model)
        report.check_note = "not optimised (--no-optimize)"
        return []
    plan = passes_for_target("compile", request.spec["kind"], mixconv=mixconv)
    run_checked(
        request.loaded, plan, report, check=check, seeds=seeds, shapes=request.shapes or None
    )
    return plan.conv_forms


def _tensor_specs(
    model: ir.Model, shapes: Mapping[str, Sequence[int]]
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The library's inputs (with the sizes the user bound) and outputs."""
    inputs = [TensorSpec.from_value(v) for v in model.graph.inputs if not v.is_initializer()]
    for spec in inputs:
        if spec.name in shapes:
            spec.shape = list(shapes[spec.name])
    return inputs, [TensorSpec.from_value(v) for v in model.graph.outputs]


def _build(
    mod,
    spec: Mapping[str, Any],
    inputs: Sequence[TensorSpec],
    report: Report,
    *,
    tune_trials: int,
    tune_db: str | os.PathLike | None,
    tune_progress: Callable[[int, int, float | None], None] | None,
):
    """Tune (when asked), then build the Relax module with our schedules; returns the
    executable and notes the timings and schedule decisions in ``report``."""
    import tvm  # see the module docstring

    from gconv_compile import tvm_schedules

    timings = report.extra["timings"]
    tvm_target = _tvm_target(spec)
    if tune_trials:
        started = time.perf_counter()
        _tune(mod, tvm_target, inputs, report, tune_trials, tune_db, tune_progress)
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
        raise UserError(f"TVM cannot build the model for {spec['kind']}: {tvm_message(exc)}")
    timings["build_s"] = time.perf_counter() - started
    report.extra["schedules"] = [d.to_dict() for d in decisions]
    return executable


def _tune(mod, tvm_target, inputs, report, trials, tune_db, progress) -> None:
    """MetaSchedule tuning of the fused module; records go to ``tune_db``."""
    import tvm  # see the module docstring

    from gconv_compile import tvm_schedules

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
    with tvm_target:
        fused = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(tvm_target))(mod)
    summary = tvm_schedules.tune(
        fused, tvm_target, trials=trials, db_dir=tune_db, progress=progress
    )
    report.extra["tuning"] = {"db": str(tune_db), "summary": summary.line()}


def tvm_version() -> str:
    """The TVM version that builds (TVM imported on call)."""
    import tvm  # see the module docstring

    return tvm.__version__


def _tvm_target(spec: Mapping[str, Any]):
    import tvm  # see the module docstring

    spec = dict(spec)
    host = spec.pop("host", None)
    return tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)


def _check_source_dir(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--emit-source {folder}: exists and is not a folder")
    parent = folder.parent if str(folder.parent) else Path(".")
    if not folder.exists() and not parent.is_dir():
        raise UserError(f"--emit-source {folder}: folder '{parent}' does not exist")
    return folder


def _import_relax(
    model: ir.Model, shapes: Mapping[str, Sequence[int]], kind: str, keep_params: bool = False
):
    """ONNX -> Relax. Only the inputs the user bound get a shape; the rest stay symbolic.
    With ``keep_params`` every initializer becomes a parameter of main after the inputs.

    The importer's own passes run first, on the model (after the check: they change how the
    model says something, not what it computes).
    """
    from tvm.relax.frontend.onnx import from_onnx  # see the module docstring

    _, refusals = passes_for_target("import", kind, input_shapes=shapes)(model)
    if refusals:
        skip = refusals[0]
        if skip.pass_name == ResolveConvTransposeOutputShape.pass_name:
            raise UserError(f"{skip.reason}, and TVM ignores output_shape; bind it with --shape")
        raise UserError(f"{skip.reason}; TVM's ONNX importer cannot read it")
    ir.external_data.load_to_model(model)  # TVM reads tensors from the proto, not from files
    proto = ir.serde.serialize_model(model)
    renames = _c_identifier_inputs(proto)
    bound = {renames.get(name, name): dims for name, dims in shapes.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mod = from_onnx(proto, shape_dict=bound or None, keep_params_in_input=keep_params)
        except Exception as exc:
            raise UserError(f"TVM's ONNX importer cannot convert the model: {tvm_message(exc)}")
    for warning in caught:
        logger.info("TVM import: %s", str(warning.message).splitlines()[0])
    return mod


def _c_identifier_inputs(proto: onnx.ModelProto) -> dict[str, str]:
    """Rename graph inputs that are not C identifiers in the proto handed to TVM (not the model).

    TVM 0.27's CUDA codegen names kernel parameters after graph inputs, so ShuffleNet's
    'gpu_0/data_0' became the parameter 'gpu_0/data_0_ptr', which nvcc rejects. The library
    is fed by position, and the sidecar keeps the ONNX names.
    """
    graph = proto.graph
    taken = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    taken |= {name for node in graph.node for name in node.output}
    renames = {}
    weights = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.name in weights or re.fullmatch(r"[A-Za-z_]\w*", value.name):
            continue
        new = re.sub(r"\W", "_", value.name)
        new = new if re.match(r"[A-Za-z_]", new) else f"v_{new}"
        while new in taken:
            new += "_"
        taken.add(new)
        renames[value.name] = value.name = new
    if renames:
        _rename_uses(graph, renames)
        for value in graph.output:
            value.name = renames.get(value.name, value.name)
    return renames


def _rename_uses(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for sub in [*subgraphs, *attribute.graphs]:
                _rename_uses(sub, renames)


def _detach_weights(mod, model: ir.Model) -> tuple[Any, dict[str, np.ndarray]]:
    """Relax module without its parameter values, and those values by ONNX initializer name
    (TVM's importer makes one parameter per initializer, in the graph's order)."""
    from tvm import relax  # see the module docstring

    mod, params = relax.frontend.detach_params(mod)
    values = params.get("main", [])
    names = list(model.graph.initializers)
    if len(names) != len(values):
        raise UserError(
            f"TVM kept {len(values)} weights for the model's {len(names)} initializers; "
            "build it without --weights-file"
        )
    return mod, {name: value.numpy() for name, value in zip(names, values)}


def _write_weights(path: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Write the weights as .npz or .safetensors (by suffix); returns the sidecar's entry."""
    if path.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
    else:
        codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
        header, offset, chunks = {}, 0, []
        for name, array in arrays.items():
            if array.dtype.name not in codes:
                raise UserError(f"--weights-file {path}: safetensors has no {array.dtype} ({name})")
            chunk = np.ascontiguousarray(array).tobytes()
            header[name] = {"dtype": codes[array.dtype.name], "shape": list(array.shape),
                            "data_offsets": [offset, offset + len(chunk)]}  # fmt: skip
            offset += len(chunk)
            chunks.append(chunk)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        data = struct.pack("<Q", len(text)) + text + b"".join(chunks)
    write_bytes_atomic(path, data)
    return {"file": path.name, "format": path.suffix.lstrip("."), "names": list(arrays)}


def _cuda_binaries(compiled: CompiledModel, out_path: Path) -> list[tuple[str, bytes]] | None:
    """Compile the library's CUDA C with nvcc for its arch, to embed in the library so that
    loading needs no CUDA compiler; without nvcc, or when nvcc rejects it, say so instead."""
    info, arch = compiled.info, compiled.info.target["arch"]
    sources = [m.inspect_source() for m in _modules(compiled.executable.mod) if m.kind == "cuda"]
    if find_nvcc() is None:
        info.cuda_note = "no nvcc at build time: the CUDA C is compiled when the library loads"
        return None
    try:
        binaries = [(text, nvcc_compile(text, arch)) for text in sources]
    except UserError as error:
        info.cuda_note = f"{error}; the library will not load on a GPU until this is fixed"
        logger.warning("%s: %s", out_path, info.cuda_note)
        compiled.report.warnings.append(info.cuda_note)
        return None
    # "file": the CLI and the bundle name where the binary is; here, the library itself.
    info.cuda_binary = {"format": "fatbin", "arch": arch, "compiler": "nvcc", "embedded": True,
                        "file": out_path.name}  # fmt: skip
    return binaries


def _pack_imports(binaries: Sequence[tuple[str, bytes]]) -> Callable[..., str]:
    """``export_library``'s ``fpack_imports``: TVM's own packing (the LLVM object holding the
    imports' bytes), with the fatbins in place of the CUDA C they were compiled from."""
    import tvm  # see the module docstring

    def pack(module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        tensor = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module)
        blob = embed_cuda_binaries(tensor.numpy().tobytes(), binaries, "fatbin")
        host = next(m for m in _modules(module) if m.kind == "llvm")
        target = host.get_function("_get_target_string")()
        packed = tvm.get_global_func("codegen.codegen_blob")(blob, is_system_lib, target, prefix)
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        packed.write_to_file(path)
        return path

    return pack


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
        written.append(write_text_atomic(folder / name, text))
    return written


def _export(
    executable, info: LibraryInfo, out_path: Path,
    cuda_binaries: Sequence[tuple[str, bytes]] | None = None,
) -> None:  # fmt: skip
    """Export the library (with ``cuda_binaries`` in place of their CUDA C) and its sidecar
    through temporary files in the destination folder."""
    folder = out_path.parent if str(out_path.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=folder))
    try:
        staged = staging / out_path.name
        options = {"fpack_imports": _pack_imports(cuda_binaries)} if cuda_binaries else {}
        try:
            executable.mod.export_library(str(staged), **options)
        except Exception as exc:
            raise UserError(f"{out_path}: TVM cannot export the library: {tvm_message(exc)}")
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
