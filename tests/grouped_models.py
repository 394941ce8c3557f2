"""Models with grouped convolutions for the expand, profile and round-trip tests.

``grouped_conv`` builds one grouped Conv/ConvTranspose; ``zoo_model`` loads a model the onnx
wheel ships under ``onnx/backend/test/data/light/`` with its ConstantOfShape(0.02) placeholder
weights replaced by seeded random initializers, so that a channel-order bug changes the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from builders import IR_VERSION, init, make_model, rng, tensor_info
from onnx import helper, numpy_helper

from gconv_compile.verify import ort_session

ZOO_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def grouped_conv(
    *,
    group: int = 2,
    channels_in: int = 8,
    channels_out: int = 6,
    kernel: Sequence[int] = (3, 3),
    spatial: Sequence = (7, 7),
    batch="N",
    transpose: bool = False,
    bias: bool = True,
    attrs: dict | None = None,
    opset: int = 17,
    seed: int = 0,
    name: str = "gconv",
) -> onnx.ModelProto:
    """X -> Conv(group) -> C -> Relu -> Y, with both C and Y graph outputs.

    C is read by a node and is a graph output, so an expansion must rewire both kinds of use.
    """
    r = rng(seed)
    op = "ConvTranspose" if transpose else "Conv"
    if transpose:
        wshape = (channels_in, channels_out // group, *kernel)
    else:
        wshape = (channels_out, channels_in // group, *kernel)
    fan_in = int(np.prod(wshape[1:]))
    inits = [init("W", (r.standard_normal(wshape) / np.sqrt(fan_in)).astype(np.float32))]
    inputs = ["X", "W"]
    if bias:
        inits.append(init("B", r.standard_normal(channels_out).astype(np.float32)))
        inputs.append("B")
    conv_attrs = {"group": group, **(attrs or {})}
    nodes = [
        helper.make_node(op, inputs, ["C"], name=name, **conv_attrs),
        helper.make_node("Relu", ["C"], ["Y"], name="relu"),
    ]
    x = tensor_info("X", [batch, channels_in, *spatial])
    rank = len(kernel)
    outputs = [
        tensor_info("Y", [batch, channels_out, *([None] * rank)]),
        tensor_info("C", [batch, channels_out, *([None] * rank)]),
    ]
    return make_model(nodes, [x], outputs, inits, opset=opset)


def conv_weights(model: onnx.ModelProto | ir.Model) -> list[tuple]:
    """(op, group, attributes, weight, bias) of every Conv/ConvTranspose, in graph order."""
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    convs = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        group = attributes.pop("group", 1)
        bias = tensors[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        convs.append((node.op_type, group, attributes, tensors[node.input[1]], bias))
    return convs


def ort_run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> dict:
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.ir_version = min(model.ir_version, IR_VERSION)
    session = ort_session(model.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2, symbolic: int = 9) -> dict:
    """Seeded normal inputs; a symbolic batch dim becomes ``batch``, other ones ``symbolic``."""
    r = rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else symbolic)
            for axis, d in enumerate(value.type.tensor_type.shape.dim)
        ]
        feeds[value.name] = r.standard_normal(dims).astype(np.float32)
    return feeds


def zoo_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """A zoo model from the onnx wheel with seeded random weights (see module docstring).

    Every ConstantOfShape whose shape is an initializer becomes an initializer of that shape:
    Conv and Gemm weights get normal values with variance 1/fan-in (so activations stay finite
    through the depth of the network), BatchNormalization scales and variances uniform in
    [0.5, 1.5), every other 1-D tensor (biases, BN offsets and means) normal with std 0.1.
    Initializers are taken off the graph inputs (IR 3 listed them there, which would make them
    overridable at run time and so not constants) and the IR version raised to 7 accordingly.
    Finally the last Gemm is scaled so the Softmax is far from saturated.
    """
    model = onnx.load(str(ZOO_DIR / f"{name}.onnx"))
    graph = model.graph
    r = rng(seed)
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, value in enumerate(node.input):
            users.setdefault(value, []).append((node, index))
    kept_nodes, new_inits = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in tensors:
            kept_nodes.append(node)
            continue
        shape = tuple(int(d) for d in tensors[node.input[0]])
        array = _random_parameter(shape, users.get(node.output[0], []), r)
        new_inits.append(init(node.output[0], array.astype(np.float32)))
    used = {value for node in kept_nodes for value in node.input}
    del graph.node[:]
    graph.node.extend(kept_nodes)
    old_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(old_inits + new_inits)
    data_inputs = [v for v in graph.input if v.name not in tensors]
    del graph.input[:]
    graph.input.extend(data_inputs)
    model.ir_version = 7
    _calibrate_logits(model)
    onnx.checker.check_model(model)
    return model


def _random_parameter(
    shape: tuple[int, ...], users: list[tuple[onnx.NodeProto, int]], r: np.random.Generator
) -> np.ndarray:
    node, index = users[0] if users else (None, -1)
    op = node.op_type if node is not None else ""
    if len(shape) >= 2:
        if op == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            fan_in = shape[1] if trans_b else shape[0]
        else:
            fan_in = int(np.prod(shape[1:]))
        return r.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(1.0 / fan_in))
    if op == "BatchNormalization" and index in (1, 4):
        return r.uniform(0.5, 1.5, shape)
    return r.standard_normal(shape) * 0.1


def _calibrate_logits(model: onnx.ModelProto, target_std: float = 2.0) -> None:
    """Scale the Gemm that feeds the Softmax so its logits have std ``target_std``.

    Random weights in a deep residual net (ShuffleNet) grow the logits to hundreds, and a
    saturated Softmax outputs one-hot vectors that hide most errors. Gemm is linear in its
    weight and bias, so scaling both scales the logits exactly.
    """
    graph = model.graph
    softmax = next((n for n in graph.node if n.op_type == "Softmax"), None)
    producer = next((n for n in graph.node if softmax and softmax.input[0] in n.output), None)
    if producer is None or producer.op_type != "Gemm":
        return
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(helper.make_tensor_value_info(softmax.input[0], 1, None))
    logits = ort_run(probe, random_feeds(model))[softmax.input[0]]
    factor = target_std / float(np.std(logits))
    for tensor in graph.initializer:
        if tensor.name in producer.input[1:3]:
            scaled = numpy_helper.to_array(tensor) * np.float32(factor)
            tensor.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), tensor.name))
