"""The GPU kit's models: single convs, a branchy ResNeXt block, float16 copies, ResNeXt-50.

Used twice: by ``scripts/make_gpu_kit.py`` (which compiles them, weights outside the code)
and on the GPU machine by ``gpu_run.py`` (which regenerates the single convs and ResNeXt-50 from
their seed there and writes their weights files, so the kit does not carry ResNeXt-50's
100 MB). Needs only numpy, onnx, ``resnext_model.py`` and ``mobilenet_model.py`` (copied into
the kit from ``benchmarks/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from mobilenet_model import depthwise_convs
from onnx import TensorProto, helper, numpy_helper
from resnext_model import IR_VERSION, OPSET, ConvShape, _Builder, build_resnext50, stage_convs

SEED = 0


@dataclass(frozen=True)
class ConvInfo:
    """What torch needs to run the same conv, and the bytes it must move."""

    stride: int
    pad: int
    group: int
    in_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"stride": self.stride, "pad": self.pad, "group": self.group,
                "in_shape": list(self.in_shape), "weight_shape": list(self.weight_shape),
                "out_shape": list(self.out_shape)}  # fmt: skip


def conv_info(shape: ConvShape) -> ConvInfo:
    return ConvInfo(
        shape.stride, shape.pad, shape.group, (1, shape.in_channels, shape.size, shape.size),
        (shape.out_channels, shape.in_channels // shape.group, shape.kernel, shape.kernel),
        (1, shape.out_channels, shape.out_size, shape.out_size),
    )  # fmt: skip


def single_conv(shape: ConvShape, seed: int = SEED) -> onnx.ModelProto:
    """One Conv with bias (no activation, so torch's conv2d is the exact twin); static shapes."""
    b = _Builder("grouped", seed)
    y = b.conv("input", shape, relu=False)
    out = helper.make_tensor_value_info(y, TensorProto.FLOAT, list(conv_info(shape).out_shape))
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(conv_info(shape).in_shape))
    return _model(helper.make_graph(b.nodes, shape.name, [x], [out], b.inits))


def resnext_convs() -> list[ConvShape]:
    return stage_convs(224)


def mobilenet_convs() -> list[ConvShape]:
    """The distinct depthwise 3x3 convs of MobileNetV2 at 224x224 (10)."""
    return depthwise_convs(224)


def branchy_block(seed: int = SEED) -> onnx.ModelProto:
    """One ResNeXt-50 stage-2 bottleneck (256 -> 512, stride 2) with its grouped conv written as
    Split -> 32 Conv -> Concat, which the fold turns into one Conv(group=32)."""
    b = _Builder("branchy", seed)
    y = b.bottleneck("input", "block", 256, 128, 56, 2)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 256, 56, 56])
    out = helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 512, 28, 28])
    return _model(helper.make_graph(b.nodes, "resnext_block_branchy", [x], [out], b.inits))


def resnext50(seed: int = SEED) -> onnx.ModelProto:
    """ResNeXt-50 32x4d, batch 1, 224x224, weights from ``seed`` (grouped form)."""
    return build_resnext50("grouped", seed=seed, batch=1, size=224)


def generate(spec: dict, dtype: str) -> onnx.ModelProto:
    """The model a manifest row describes as ``{"function", "args", "seed"}``, in ``dtype``."""
    function, args, seed = spec["function"], spec.get("args", {}), spec["seed"]
    if function == "single_conv":
        model = single_conv(ConvShape(**args), seed)
    elif function == "resnext50":
        model = resnext50(seed)
    else:
        raise ValueError(f"no model generator {function!r}")
    return to_float16(model) if dtype == "float16" else model


def generator_spec(shape: ConvShape | None = None) -> dict:
    """What :func:`generate` needs to remake a single conv (or ResNeXt-50 when None)."""
    if shape is None:
        return {"function": "resnext50", "seed": SEED}
    fields = ("name", "in_channels", "out_channels", "size", "kernel", "stride", "group")
    return {"function": "single_conv", "args": {f: getattr(shape, f) for f in fields},
            "seed": SEED}  # fmt: skip


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float32 tensor of the model (initializers, inputs, outputs) as float16."""
    return _retyped(model, TensorProto.FLOAT, TensorProto.FLOAT16)


def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float16 model's exact values in float32: the reference a float16 build is held to."""
    return _retyped(model, TensorProto.FLOAT16, TensorProto.FLOAT)


def _retyped(model: onnx.ModelProto, old: int, new: int) -> onnx.ModelProto:
    """A copy of ``model`` with its ``old``-typed initializers, inputs and outputs as ``new``."""
    dtype = helper.tensor_dtype_to_np_dtype(new)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == old:
            values = numpy_helper.to_array(tensor).astype(dtype)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(values, tensor.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == old:
            value.type.tensor_type.elem_type = new
    return out


def reduction_depth(model: onnx.ModelProto) -> tuple[int, int]:
    """(longest dot product, number of Conv/Gemm layers) of the model, for float16 tolerances."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    weights.update(
        {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    )
    longest, layers = 1, 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in weights:
            dims = weights[node.input[1]]
            length = int(np.prod(dims[1:])) if node.op_type == "Conv" else max(dims)
            longest, layers = max(longest, length), layers + 1
    return longest, max(layers, 1)


FLOAT16_STEP = 2.0**-11  # float16's unit roundoff: half the spacing of values in [1, 2)


def float16_tolerance(reference: np.ndarray, length: int, layers: int) -> tuple[float, float]:
    """(atol, rtol) a float16 build is held to against float32 on the same float16 values.

    The inputs and weights are exactly representable, so the error comes from rounding sums
    and outputs to float16. One output sums ``length`` products; if TVM accumulates in float16,
    each addition adds an error of at most one step of the partial sum, and independent errors
    add like a random walk: about ``2^-11 * sqrt(length)`` of the output's scale (its RMS).
    ``layers`` convs in sequence add their errors in quadrature again (``sqrt(layers)``); a
    factor 4 is the margin for a tail of the distribution. rtol 2^-10 covers the final rounding
    of each output (at most one step) twice over. ``layers`` counts every Conv and Gemm, also
    parallel branches, so it overstates the depth of branchy models: the rule errs loose.

    It still catches wrong code: atol is ``4 * 2^-11 * sqrt(length * layers)`` RMS, below 1 RMS
    while length * layers < 262144, and a wrong channel order or a missed group moves outputs by
    about 1.4 RMS (the difference of two independent outputs of equal RMS).
    """
    finite = reference[np.isfinite(reference)].astype(np.float64)
    scale = float(np.sqrt(np.mean(np.square(finite)))) if finite.size else 1.0
    atol = 4 * FLOAT16_STEP * math.sqrt(length * layers) * max(scale, 1e-3)
    return atol, 2 * FLOAT16_STEP


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model
