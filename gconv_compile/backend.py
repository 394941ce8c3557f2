"""An ``onnx.backend`` for running ONNX's conformance tests through gconv-compile and TVM.

``prepare`` does what ``gconv-compile compile --target llvm`` does, in memory: validate, fold
split-conv-concat blocks (the target's profile), import into TVM Relax, build for this CPU; the
returned rep runs the Relax VM. So onnx's own node tests (``onnx.backend.test.BackendTest``)
exercise the whole product, not just TVM::

    import onnx.backend.test
    from gconv_compile.backend import GconvBackend

    tests = onnx.backend.test.BackendTest(GconvBackend, __name__)
    tests.include(r"^test_conv_")
    globals().update(tests.test_cases)

:data:`KNOWN_FAILURES` lists the cases in the conv, convtranspose, split, concat and slice
families (and pytorch-converted Conv cases) that do not pass, each with the reason;
``tests/test_backend.py`` runs the rest and ``scripts/backend_conformance.py`` writes the table
in ``docs/backend_conformance.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep, namedtupledict

from gconv_compile.build import CompiledModel, compile

logger = logging.getLogger(__name__)

# The families the conformance run covers: node tests by prefix, pytorch-converted Conv cases.
CONFORMANCE_PATTERN = (
    r"^test_(conv|convinteger|convtranspose|split|concat|slice)(_|$)"
    r"|^test_(Conv[123]d|ConvTranspose2d)(_|$)"
)

# name (without the _cpu suffix) -> why it does not pass. Kept in sync with a real run by
# scripts/backend_conformance.py, which fails when a case listed here passes or one not listed
# fails.
_CONV_INTEGER = "TVM 0.27's ONNX importer has no ConvInteger (quantized conv)"
_ZERO_SIZE_SPLIT = (
    'a zero-size split part: TVM 0.27\'s split cannot make one ("split_indices must be sorted")'
)
_SEQUENCE = "the output is a tensor sequence; TVM's Split-to-sequence needs constant split sizes"
KNOWN_FAILURES: dict[str, str] = {
    "test_convinteger_with_padding": _CONV_INTEGER,
    "test_convinteger_without_padding": _CONV_INTEGER,
    "test_split_zero_size_splits_opset13": _ZERO_SIZE_SPLIT,
    "test_split_zero_size_splits_opset18": _ZERO_SIZE_SPLIT,
    "test_split_to_sequence_1": _SEQUENCE,
    "test_split_to_sequence_2": _SEQUENCE,
    "test_split_to_sequence_nokeepdims": (
        "the output is a tensor sequence; the Relax VM returns its 6 tensors as a tuple and the "
        "backend maps one tensor per graph output"
    ),
}


# Operand positions that decide shapes: a static compiler needs them constant.
_SHAPE_OPERANDS: dict[str, tuple[int, ...]] = {
    "Split": (1,), "Slice": (1, 2, 3, 4), "Reshape": (1,), "Expand": (1,), "Tile": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2),
}  # fmt: skip


def shape_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that only decide shapes (split sizes, slice bounds, ...), in input order."""
    names = {v.name for v in model.graph.input} - {t.name for t in model.graph.initializer}
    used = set()
    for node in model.graph.node:
        for index in _SHAPE_OPERANDS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] in names:
                used.add(node.input[index])
    return [v.name for v in model.graph.input if v.name in used]


def _specialised(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with the given shape inputs turned into constants."""
    special = onnx.ModelProto()
    special.CopyFrom(model)
    kept = [v for v in special.graph.input if v.name not in values]
    del special.graph.input[:]
    special.graph.input.extend(kept)
    for name, value in values.items():
        special.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    return special


class GconvBackendRep(BackendRep):
    """A model compiled for this CPU; ``run`` takes inputs in graph-input order (or by name).

    A model whose shapes depend on input values (split sizes fed at run time) is compiled at
    the first ``run`` with those values as constants, once per distinct set of values, as a
    static compiler must.
    """

    def __init__(self, model: onnx.ModelProto, compiled: CompiledModel | None = None) -> None:
        self.model = model
        self.compiled = compiled
        self._specialise = shape_inputs(model) if compiled is None else []
        self._builds: dict[tuple, CompiledModel] = {}
        initializers = {t.name for t in model.graph.initializer}
        self._all_inputs = [v.name for v in model.graph.input]
        self._data_inputs = [n for n in self._all_inputs if n not in initializers]
        self._output_names = [o.name for o in model.graph.output]

    def _build_for(self, feeds: Mapping[str, np.ndarray]) -> CompiledModel:
        if self.compiled is not None:
            return self.compiled
        values = {name: feeds[name] for name in self._specialise}
        key = tuple((name, v.dtype.str, v.shape, v.tobytes()) for name, v in values.items())
        if key not in self._builds:
            self._builds[key] = compile(_specialised(self.model, values), "llvm", check=False)
        return self._builds[key]

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        if isinstance(inputs, Mapping):
            feeds = {name: np.asarray(value) for name, value in inputs.items()}
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            inputs = list(inputs)
            # Inputs come in graph-input order; an IR<4 model may list initializers there too.
            names = self._data_inputs if len(inputs) == len(self._data_inputs) else self._all_inputs
            feeds = {
                name: np.asarray(value)
                for name, value in zip(names, inputs)
                if name in self._data_inputs
            }
        compiled = self._build_for(feeds)
        outputs = compiled.runner().run(
            {k: v for k, v in feeds.items() if k not in self._specialise}
        )
        return namedtupledict("Outputs", self._output_names)(
            *[outputs[name] for name in self._output_names]
        )


class GconvBackend(Backend):
    """optimize -> TVM compile (llvm) -> Relax VM, on the CPU."""

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return cls.supports_device(device)

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> GconvBackendRep:
        super().prepare(model, device, **kwargs)  # onnx.checker
        if not cls.supports_device(device):
            raise RuntimeError(f"gconv-compile's backend runs on CPU, not {device}")
        if shape_inputs(model):
            return GconvBackendRep(model)  # compiled at run time, per set of shape values
        # No onnxruntime check of the fold here: the conformance test compares the outputs.
        return GconvBackendRep(model, compile(model, "llvm", check=False))

    @classmethod
    def run_model(
        cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any
    ) -> tuple[np.ndarray, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(
        cls,
        node: onnx.NodeProto,
        inputs: Sequence[np.ndarray],
        device: str = "CPU",
        outputs_info: Sequence[tuple] | None = None,
        **kwargs: Any,
    ) -> tuple[np.ndarray, ...]:
        raise NotImplementedError("gconv-compile runs models; wrap the node in a graph")

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device.upper() == "CPU"


prepare = GconvBackend.prepare
run_model = GconvBackend.run_model
supports_device = GconvBackend.supports_device
