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

from gconv_compile.compile import CompiledModel, compile

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
_DYNAMIC_SPLIT = (
    "the split sizes are a graph input fed at run time; TVM 0.27's importer needs them "
    'constant ("Dynamic Split not yet supported")'
)
_SEQUENCE = "the output is a tensor sequence; TVM's Split-to-sequence needs constant split sizes"
KNOWN_FAILURES: dict[str, str] = {
    "test_convinteger_with_padding": _CONV_INTEGER,
    "test_convinteger_without_padding": _CONV_INTEGER,
    "test_split_variable_parts_1d_opset13": _DYNAMIC_SPLIT,
    "test_split_variable_parts_1d_opset18": _DYNAMIC_SPLIT,
    "test_split_variable_parts_2d_opset13": _DYNAMIC_SPLIT,
    "test_split_variable_parts_2d_opset18": _DYNAMIC_SPLIT,
    "test_split_variable_parts_default_axis_opset13": _DYNAMIC_SPLIT,
    "test_split_variable_parts_default_axis_opset18": _DYNAMIC_SPLIT,
    "test_split_zero_size_splits_opset13": _DYNAMIC_SPLIT,
    "test_split_zero_size_splits_opset18": _DYNAMIC_SPLIT,
    "test_split_to_sequence_1": _SEQUENCE,
    "test_split_to_sequence_2": _SEQUENCE,
    "test_split_to_sequence_nokeepdims": (
        "the output is a tensor sequence; the Relax VM returns its 6 tensors as a tuple and the "
        "backend maps one tensor per graph output"
    ),
}


class GconvBackendRep(BackendRep):
    """A model compiled for this CPU; ``run`` takes inputs in graph-input order (or by name)."""

    def __init__(self, compiled: CompiledModel, model: onnx.ModelProto) -> None:
        self.compiled = compiled
        self._runner = compiled.runner()
        initializers = {t.name for t in model.graph.initializer}
        self._all_inputs = [v.name for v in model.graph.input]
        self._data_inputs = [n for n in self._all_inputs if n not in initializers]
        self._output_names = [spec.name for spec in compiled.info.outputs]

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
        outputs = self._runner.run(feeds)
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
        # No onnxruntime check of the fold here: the conformance test compares the outputs.
        compiled = compile(model, "llvm", check=False)
        return GconvBackendRep(compiled, model)

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
