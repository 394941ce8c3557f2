"""Running onnxruntime as the reference: inputs, sessions, and the outputs every check compares.

Every check runs onnxruntime with all graph optimisations off on the model exactly as the user
gave it (the file itself when onnxruntime can read it, else a faithful serialisation), on seeded
random inputs with every symbolic dim bound, or on the user's inputs:

- ``optimize``, ``expand`` and ``compile`` check their rewrite with :class:`ReferenceRun`
  (CPU EP, before and after the rewrite; see :func:`gconv_compile.pipeline.run_checked`);
- ``verify`` runs :func:`run_reference` on the CPU EP, or the CUDA EP with TF32 off when the
  TVM build it checks runs on a GPU.

The comparison itself is :mod:`gconv_compile.compare`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from gconv_compile.compare import CheckResult, OutputStats, compare_results
from gconv_compile.errors import UserError, one_line
from gconv_compile.model_io import ORT_MAX_IR_VERSION, LoadedModel, to_ort_source

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 2
DEFAULT_SYMBOLIC_DIM = 16
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = ("CUDAExecutionProvider", {"use_tf32": "0"})


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """Inputs a caller must feed (initializers listed as inputs are optional and skipped)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def check_shape_names(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """``--shape`` sizes name inputs of the model, with their rank and their static dims.

    Raises:
        UserError: An unknown input name, another rank, or a size that contradicts a static dim.
    """
    names = {v.name for v in graph_inputs(model)}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise UserError(f"--shape names unknown input(s) {unknown}; inputs are {sorted(names)}")
    for value in graph_inputs(model):
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


def concrete_input_shapes(
    model: ir.Model, overrides: Mapping[str, Sequence[int]] | None = None
) -> dict[str, list[int]]:
    """Bind every symbolic dim: same symbol, same size; batch 2, other symbols 16."""
    overrides = dict(overrides or {})
    check_shape_names(model, overrides)
    bound: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for value in graph_inputs(model):
        if value.name in overrides:
            dims = list(overrides[value.name])
            for dim, size in zip(value.shape or (), dims):
                if not isinstance(dim, int) and dim.value is not None:
                    bound.setdefault(dim.value, size)
            shapes[value.name] = dims
            continue
        if value.shape is None:
            raise UserError(f"input '{value.name}' has no shape; give one with --shape")
        dims = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(dim)
                continue
            default = DEFAULT_BATCH if axis == 0 else DEFAULT_SYMBOLIC_DIM
            if dim.value is None:
                dims.append(default)
            else:
                dims.append(bound.setdefault(dim.value, default))
        shapes[value.name] = dims
    return shapes


def random_inputs(
    model: ir.Model, seed: int, shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """Seeded random feeds: normal floats, small non-negative integers, random booleans."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in graph_inputs(model):
        dims = tuple(shapes[value.name])
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(dims) < 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, 4, size=dims).astype(dtype)
        else:
            raise UserError(f"input '{value.name}': cannot make random data of type {dtype}")
    return feeds


def ort_session(
    source: str | bytes,
    providers: Sequence[str] | None = None,
    *,
    external_data_folder: str | None = None,
):
    """An onnxruntime session with every graph optimisation off.

    ``external_data_folder``: where a model given as bytes finds its external tensors.
    """
    import onnxruntime as ort  # here, not at the top: explain and --no-check never need it

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = min(4, os.cpu_count() or 1)
    if external_data_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", external_data_folder
        )
    return ort.InferenceSession(
        source, options, providers=list(providers or ["CPUExecutionProvider"])
    )


def run_ort_model(
    model: ir.Model,
    feeds_list: Sequence[Mapping[str, np.ndarray]],
    *,
    source: str | bytes | None = None,
    providers: Sequence[str] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run ``model`` (or the already serialised ``source``) on each feed dict."""
    with tempfile.TemporaryDirectory(prefix="gconv-ort-") as workdir:
        if source is None:
            source = to_ort_source(model, workdir)
        session = ort_session(source, providers)
        names = [o.name for o in session.get_outputs()]
        results = []
        for feeds in feeds_list:
            values = session.run(names, dict(feeds))
            results.append(dict(zip(names, values)))
        return results


def reference_source(loaded: LoadedModel, stack: contextlib.ExitStack) -> str | bytes:
    """What onnxruntime reads for the model as the user gave it: the file itself when it can,
    else a serialisation in a temporary folder that ``stack`` removes."""
    if loaded.path is not None and loaded.model.ir_version <= ORT_MAX_IR_VERSION:
        return str(loaded.path)
    workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gconv-before-"))
    return to_ort_source(loaded.model, workdir)


def run_reference(
    loaded: LoadedModel, feeds_list: Sequence[Mapping[str, np.ndarray]], *, on_gpu: bool
) -> tuple[list[dict[str, np.ndarray]], str, str | None]:
    """onnxruntime on the model as given; the CUDA EP (TF32 off) when ``on_gpu``.

    Returns:
        The outputs of each feed dict, what ran them, and a warning (None when none).

    Raises:
        UserError: onnxruntime cannot run the model.
    """
    providers: list[Any] = [CUDA_PROVIDER, CPU_PROVIDER] if on_gpu else [CPU_PROVIDER]
    with contextlib.ExitStack() as stack:
        try:
            source = reference_source(loaded, stack)
            results, used = _run_session(source, feeds_list, providers)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"onnxruntime cannot run the input model: {one_line(exc)}")
    if on_gpu and used[0] != CUDA_PROVIDER[0]:
        warning = "onnxruntime could not use its CUDA execution provider; the reference ran on CPU"
        return results, "onnxruntime CPU EP (ORT_DISABLE_ALL; CUDA EP unavailable)", warning
    if on_gpu:
        return results, "onnxruntime CUDA EP (ORT_DISABLE_ALL, TF32 off)", None
    return results, "onnxruntime CPU EP (ORT_DISABLE_ALL)", None


def _run_session(
    source: str | bytes, feeds_list: Sequence[Mapping[str, np.ndarray]], providers: Sequence[Any]
) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    session = ort_session(source, providers)
    names = [o.name for o in session.get_outputs()]
    results = [dict(zip(names, session.run(names, dict(feeds)))) for feeds in feeds_list]
    return results, session.get_providers()


def with_extra_outputs(
    source: str | bytes, names: Sequence[str]
) -> tuple[bytes, str | None, list[str]]:
    """``source`` (a serialised model or its path) with the intermediate values ``names`` added
    as graph outputs, for a session to expose them; the model's graph is not otherwise changed.

    Returns:
        The serialised model, the folder its external tensors are read from (None for bytes),
        and the names added (those some node of the main graph produces, not already outputs).
    """
    if isinstance(source, bytes):
        proto, folder = onnx.load_from_string(source), None
    else:
        proto = onnx.load(source, load_external_data=False)
        folder = os.path.dirname(os.path.abspath(source))
    produced = {name for node in proto.graph.node for name in node.output}
    present = {output.name for output in proto.graph.output}
    added = [name for name in names if name in produced and name not in present]
    for name in added:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return proto.SerializeToString(), folder, added


def run_with_values(
    source: str | bytes, feeds_list: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """Run ``source`` on each feed dict and return the graph outputs and the values ``names``."""
    if names:
        serialised, folder, _ = with_extra_outputs(source, names)
        session = ort_session(serialised, external_data_folder=folder)
    else:  # no copy of the model to make
        session = ort_session(source)
    outputs = [o.name for o in session.get_outputs()]
    return [dict(zip(outputs, session.run(outputs, dict(feeds)))) for feeds in feeds_list]


class ReferenceRun:
    """Reference outputs of a model, computed once before a rewrite mutates it.

    :meth:`check` compares the graph outputs and, when asked, the rewritten blocks' own outputs
    (intermediate values whose names the rewrite kept): both models run with those values
    exposed as extra outputs, the model before the rewrite from ``source`` (which must outlive
    the check). Where the local error of a wrong rewrite is small (one channel's bias off by
    1e-3 of its scale), it is visible at the block and diluted below the float reordering noise
    40 layers later; comparing the block itself, with its own RMS, catches it.
    """

    def __init__(
        self,
        model: ir.Model,
        *,
        seeds: Sequence[int] = (0, 1, 2),
        shapes: Mapping[str, Sequence[int]] | None = None,
        source: str | bytes | None = None,
    ) -> None:
        self.seeds = list(seeds)
        self.source = source
        self.shapes = concrete_input_shapes(model, shapes)
        self.feeds = [random_inputs(model, seed, self.shapes) for seed in self.seeds]
        try:
            self.outputs = run_ort_model(model, self.feeds, source=source)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                "onnxruntime cannot run the input model, so the rewrite cannot be checked "
                f"({one_line(exc)}); pass --no-check to skip the check"
            ) from exc

    def check(self, candidate: ir.Model, values: Sequence[str] = ()) -> CheckResult:
        """Run ``candidate`` on the same inputs and compare its outputs, and the intermediate
        values ``values`` of both models (when the reference was given a ``source``)."""
        names = [o.name for o in candidate.graph.outputs]
        watched = [v for v in values if v not in names] if self.source is not None else []
        try:
            with tempfile.TemporaryDirectory(prefix="gconv-check-") as workdir:
                source = to_ort_source(candidate, workdir)
                outputs = run_with_values(source, self.feeds, watched)
        except Exception as exc:
            note = f"onnxruntime failed on the rewritten model: {one_line(exc)}"
            failed = [
                OutputStats.failed(name, note, value) for name, value in self.outputs[0].items()
            ]
            return CheckResult(failed, self.seeds, self.shapes)
        stats = compare_results(
            self.outputs, [{k: run[k] for k in self.outputs[0] if k in run} for run in outputs]
        )
        result = CheckResult(stats, self.seeds, self.shapes)
        watched = [v for v in watched if v in outputs[0]]
        if watched:
            try:
                before = run_with_values(self.source, self.feeds, watched)
            except Exception as exc:  # the outputs were compared; say what was not
                logger.warning("rewritten values not compared: %s", one_line(exc))
                return result
            after = [{v: run[v] for v in watched} for run in outputs]
            result.values = compare_results([{v: r[v] for v in watched} for r in before], after)
        return result
