"""Loading and saving ONNX models safely.

Loading validates before anything else runs: the file parses, passes the ONNX checker, has an IR
and opset version we handle, and every external-data reference stays inside the model's folder.
Saving is atomic: the model (and its external data) are written to a temporary folder beside the
destination and moved into place only when complete, so a failure never leaves a half-written
file and never touches the input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir import external_data as ir_external_data

from gconv_compile.errors import UserError, one_line
from gconv_compile.files import TMP_PREFIX

logger = logging.getLogger(__name__)

# onnxruntime 1.31 reads IR versions up to 13; onnx 1.23 writes 14 by default.
ORT_MAX_IR_VERSION = 13
# Tensors above this size go to external data when the output uses it (onnx's own default).
EXTERNAL_DATA_THRESHOLD = 1024


@dataclasses.dataclass
class LoadedModel:
    """A model and where it came from.

    Attributes:
        model: The model in onnx-ir form (external tensors are memory-mapped, not read).
        path: The file it was read from, or None for an in-memory model.
        external_files: Resolved paths of the external-data files the model refers to.
    """

    model: ir.Model
    path: Path | None = None
    external_files: frozenset[Path] = frozenset()

    @property
    def has_external_data(self) -> bool:
        return bool(self.external_files)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (back on after, if it was on).

    Building or rewriting an onnx-ir graph allocates objects by the hundred thousand, each
    allocation burst triggering a collection that walks every live object of the graph: about a
    quarter of ``optimize`` on a 10k-node model (``benchmarks/fold_pass_scaling.py --gc-off``),
    and what makes its time grow faster than the graph. Nothing made there is garbage until the
    block ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_model(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> LoadedModel:
    """Load and validate a model from a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.

    Raises:
        UserError: The model cannot be read, fails validation, or refers to external data
            outside its folder.
    """
    if isinstance(source, ir.Model):
        return LoadedModel(source, None, _external_files_of_ir(source))
    if isinstance(source, onnx.ModelProto):
        _validate_proto(source, "model")
        # onnx-ir wraps the proto's tensors instead of copying them, and naming a Constant
        # node's tensor writes into it: work on a copy so the caller's proto stays as it was.
        copy = onnx.ModelProto()
        copy.CopyFrom(source)
        with gc_paused():
            model = ir.serde.deserialize_model(copy)
        return LoadedModel(model, None, frozenset())
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    raise UserError(
        f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(source).__name__}"
    )


def _load_path(path: Path) -> LoadedModel:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), format="protobuf", load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        if _looks_like_text(path):
            raise UserError(f"{path}: not an ONNX model (a text file, not a binary protobuf)")
        raise UserError(f"{path}: not an ONNX model (protobuf parse failed: {one_line(exc)})")
    if not proto.HasField("graph") or proto.ir_version == 0:
        if _looks_like_text(path):
            raise UserError(f"{path}: not an ONNX model (a text file, not a binary protobuf)")
        raise UserError(f"{path}: not an ONNX model (no graph or IR version)")
    external_files = _validate_external_data(proto, path.parent.resolve(), path)
    # The checker resolves external-data locations against the model's folder only when it is
    # given the path; given the proto alone it looks in the working directory.
    _validate_proto(proto, str(path), checker_source=str(path))
    with gc_paused():
        model = ir.serde.deserialize_model(proto)
    ir_external_data.set_base_dir(model.graph, str(path.parent))
    for function in model.functions.values():
        ir_external_data.set_base_dir(function.graph, str(path.parent))
    return LoadedModel(model, path, external_files)


def _looks_like_text(path: Path) -> bool:
    """True when the file starts with printable UTF-8 text (a binary ONNX model never does)."""
    with open(path, "rb") as file:
        head = file.read(4096)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the 4096-byte boundary is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return bool(text) and all(c.isprintable() or c in "\t\n\r\f" for c in text)


def _validate_proto(
    proto: onnx.ModelProto, label: str, checker_source: str | onnx.ModelProto | None = None
) -> None:
    if proto.ir_version < 3 or proto.ir_version > onnx.IR_VERSION:
        raise UserError(
            f"{label}: IR version {proto.ir_version} is not supported "
            f"(this build handles 3 to {onnx.IR_VERSION})"
        )
    max_opset = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= max_opset:
            raise UserError(
                f"{label}: ai.onnx opset {opset.version} is not supported "
                f"(this build handles 1 to {max_opset})"
            )
    try:
        onnx.checker.check_model(proto if checker_source is None else checker_source)
    except Exception as exc:  # ValidationError, or C++ errors surfaced as others
        raise UserError(f"{label}: fails the ONNX checker: {one_line(exc)}")


def _iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _iter_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                if attr.HasField("g"):
                    yield from _iter_tensors(attr.g)


def _validate_external_data(
    proto: onnx.ModelProto, base_dir: Path, model_path: Path
) -> frozenset[Path]:
    """Check every external-data reference; return the resolved files used."""
    files: set[Path] = set()
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        label = f"{model_path}: tensor '{tensor.name}'"
        if not location:
            raise UserError(f"{label} has external data without a location")
        if os.path.isabs(location) or Path(location).is_absolute():
            raise UserError(f"{label}: external data location '{location}' is an absolute path")
        if ".." in Path(location).parts:
            raise UserError(f"{label}: external data location '{location}' leaves the model folder")
        resolved = (base_dir / location).resolve()
        if base_dir != resolved and base_dir not in resolved.parents:
            raise UserError(
                f"{label}: external data '{location}' resolves outside the model folder "
                f"(symlink to {resolved})"
            )
        if not resolved.is_file():
            raise UserError(f"{label}: external data file '{location}' is missing")
        size = resolved.stat().st_size
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        if length is not None and offset + int(length) > size:
            raise UserError(
                f"{label}: external data '{location}' is truncated "
                f"(needs {offset + int(length)} bytes, file has {size})"
            )
        files.add(resolved)
    return frozenset(files)


def _external_files_of_ir(model: ir.Model) -> frozenset[Path]:
    files = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(Path(tensor.path).resolve())
    return frozenset(files)


def check_output_path(out: str | os.PathLike, loaded: LoadedModel | None = None) -> Path:
    """Refuse output paths that would overwrite the input or cannot be written."""
    out_path = Path(out)
    if out_path.exists() and out_path.is_dir():
        raise UserError(f"{out_path}: is a folder; give a file name for the output")
    if loaded is not None and loaded.path is not None:
        in_path = loaded.path
        if out_path.resolve() == in_path.resolve() or (
            out_path.exists() and os.path.samefile(out_path, in_path)
        ):
            raise UserError(f"{out_path}: output would overwrite the input; choose another path")
    parent = out_path.parent if str(out_path.parent) else Path(".")
    if not parent.is_dir():
        existing = next((p for p in parent.parents if p.exists()), None)
        if parent.exists() or (existing is not None and not existing.is_dir()):
            blocker = parent if parent.exists() else existing
            raise UserError(
                f"{out_path}: '{blocker}' is not a folder, so the output cannot go there"
            )
        raise UserError(f"{out_path}: folder '{parent}' does not exist")
    return out_path


def external_data_name(out_path: Path) -> str:
    return out_path.name + ".data"


def save_model(
    model: ir.Model,
    out: str | os.PathLike,
    *,
    loaded: LoadedModel | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``out`` atomically.

    Args:
        model: The model to write; it is not modified.
        out: Destination path.
        loaded: Where the model came from: guards against overwriting the input or its
            external data, and decides whether the output uses external data.
        external_data: Force external data on or off; by default it is used when the input
            had it, or when the model would not fit in one protobuf.

    Returns:
        The path written.

    Raises:
        UserError: The destination is the input, or cannot be written.
    """
    out_path = check_output_path(out, loaded)
    if external_data is None:
        external_data = bool(loaded and loaded.has_external_data) or _needs_external_data(model)
    data_name = external_data_name(out_path) if external_data else None
    if data_name is not None and loaded is not None:
        data_target = (out_path.parent / data_name).resolve()
        if data_target in loaded.external_files:
            raise UserError(
                f"{out_path}: its external data '{data_name}' would overwrite the input's "
                "weights; choose another output name"
            )
    parent = out_path.parent if str(out_path.parent) else Path(".")
    try:
        staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
    except OSError as exc:
        raise UserError(f"{out_path}: cannot write to folder '{parent}': {exc.strerror}")
    placed_data: Path | None = None
    try:
        staged_model = staging / out_path.name
        if data_name is not None:
            ir.save(
                model,
                staged_model,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_DATA_THRESHOLD,
                # 64 KiB offsets let onnxruntime map large tensors instead of copying them.
                alignment=65536,
            )
            # Data first, model last: a model file never points at data that is not there yet.
            if (staging / data_name).exists():
                placed_data = out_path.parent / data_name
                os.replace(staging / data_name, placed_data)
        else:
            ir.save(model, staged_model)
        os.replace(staged_model, out_path)
    except OSError as exc:
        if placed_data is not None:
            placed_data.unlink(missing_ok=True)
        raise UserError(f"{out_path}: cannot write: {exc.strerror or exc}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s", out_path)
    return out_path


def _needs_external_data(model: ir.Model) -> bool:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total > 1_800_000_000


def has_external_tensors(model: ir.Model) -> bool:
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for graph in model.graphs()
        for value in graph.initializers.values()
    )


def to_ort_source(model: ir.Model, workdir: str | os.PathLike) -> str | bytes:
    """Serialise ``model`` into something ``onnxruntime.InferenceSession`` accepts.

    Small in-memory models become bytes. Models with external tensors (or too large for one
    protobuf) are written, with their data, to a spill folder and passed by path; the IR version
    is lowered to what onnxruntime reads when needed. What the model computes is not changed,
    but where its large tensors live is: they are moved to the spill file and memory-mapped
    from there, so that the model and onnxruntime do not each hold a copy of the weights (a
    rewritten weight would otherwise stay in memory while onnxruntime maps the same bytes from
    the file). The spill folder is removed when the model is garbage-collected or the process
    exits.

    Args:
        model: The model; its large initializers become memory-mapped external tensors.
        workdir: Unused for large models (the spill must outlive the caller's folder, since the
            model now reads from it); kept for callers that pass one.
    """
    needs_file = has_external_tensors(model) or _needs_external_data(model)
    original_ir = model.ir_version
    if model.ir_version > ORT_MAX_IR_VERSION:
        model.ir_version = ORT_MAX_IR_VERSION
    try:
        if needs_file:
            return str(_spill(model))
        return ir.serde.serialize_model(model).SerializeToString()
    finally:
        model.ir_version = original_ir


# id(model) -> finalizer that removes the model's current spill folder.
_SPILLS: dict[int, weakref.finalize] = {}


def _spill(model: ir.Model) -> Path:
    """Move the model's large initializers to a fresh spill folder; return its model file."""
    folder = Path(tempfile.mkdtemp(prefix="gconv-spill-"))
    path = folder / "model.onnx"
    data_name = "model.onnx.data"
    try:
        # Offsets aligned to 64 KiB let onnxruntime map the tensors instead of copying them.
        ir_external_data.unload_from_model(
            model, folder, data_name, size_threshold_bytes=EXTERNAL_DATA_THRESHOLD,
            alignment=65536,
        )  # fmt: skip
        onnx.save(ir.serde.serialize_model(model), path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    # The model now reads from this folder only: the previous spill (if any) can go.
    previous = _SPILLS.pop(id(model), None)
    if previous is not None:
        previous()
    _SPILLS[id(model)] = weakref.finalize(model, _remove_spill, id(model), str(folder))
    return path


def _remove_spill(model_id: int, folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    finalizer = _SPILLS.get(model_id)
    if finalizer is not None and not finalizer.alive:
        _SPILLS.pop(model_id, None)


def count_nodes(model: ir.Model) -> int:
    """Nodes in the main graph, its subgraphs and model-local functions."""
    total = sum(len(graph) for graph in model.graphs())
    total += sum(len(function) for function in model.functions.values())
    return total
