"""Models with grouped convolutions for the expand, profile and round-trip tests.

``grouped_conv`` builds one grouped Conv/ConvTranspose; ``zoo_model`` loads a model the onnx
wheel ships under ``onnx/backend/test/data/light/`` with its ConstantOfShape(0.02) placeholder
weights replaced by seeded random initializers, so that a channel-order bug changes the outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from builders import IR_VERSION, init, make_model, rng, tensor_info
from onnx import helper, numpy_helper

# The tests' one onnxruntime-equality helper, under the name the expand tests use.
from ort_equal import assert_ort_equal as assert_same_outputs  # noqa: E402, F401

from gconv_compile.reference import ort_session

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


def conv_chain(
    layers: Sequence[tuple],
    *,
    channels_in: int = 8,
    spatial: Sequence = (6, 6),
    batch="N",
    opset: int = 17,
    seed: int = 0,
) -> onnx.ModelProto:
    """X -> conv layers in sequence -> Y; each layer is (name, op, group, C_out).

    3x3 kernels with 'same' pads for Conv, stride-1 3x3 without pads for ConvTranspose (so the
    spatial size grows by 2); every layer has a bias.
    """
    r = rng(seed)
    nodes, inits = [], []
    current, channels = "X", channels_in
    for name, op, group, channels_out in layers:
        if op == "Conv":
            wshape = (channels_out, channels // group, 3, 3)
            attrs = {"pads": [1, 1, 1, 1]}
        else:
            wshape = (channels, channels_out // group, 3, 3)
            attrs = {}
        fan_in = int(np.prod(wshape[1:]))
        inits.append(
            init(f"{name}.w", (r.standard_normal(wshape) / np.sqrt(fan_in)).astype(np.float32))
        )
        inits.append(init(f"{name}.b", r.standard_normal(channels_out).astype(np.float32)))
        nodes.append(helper.make_node(op, [current, f"{name}.w", f"{name}.b"], [f"{name}.y"],
                                      name=name, group=group, **attrs))  # fmt: skip
        current, channels = f"{name}.y", channels_out
    nodes.append(helper.make_node("Identity", [current], ["Y"], name="out"))
    x = tensor_info("X", [batch, channels_in, *spatial])
    y = tensor_info("Y", [batch, channels, None, None])
    return make_model(nodes, [x], [y], inits, opset=opset)


def grouped_conv_in_function(
    *, group: int = 4, channels: int = 8, opset: int = 17
) -> onnx.ModelProto:
    """X -> local function (Conv(group) with weights from Constant nodes) -> Y."""
    r = rng(3)
    weight = r.standard_normal((channels, channels // group, 3, 3)).astype(np.float32)
    bias = r.standard_normal(channels).astype(np.float32)
    body = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(bias)),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="fconv", group=group, pads=[1] * 4),
    ]
    function = helper.make_function(
        "local", "GroupedBlock", ["x"], ["y"], body, [helper.make_opsetid("", opset)]
    )
    node = helper.make_node("GroupedBlock", ["X"], ["Y"], domain="local", name="call")
    return make_model(
        [node], [tensor_info("X", ["N", channels, 5, 5])], [tensor_info("Y", ["N", channels, 5, 5])],
        opset=opset, functions=[function], extra_opsets=[helper.make_opsetid("local", 1)],
    )  # fmt: skip


def grouped_conv_in_if(*, group: int = 2, channels: int = 4) -> onnx.ModelProto:
    """X, flag -> If(flag) with a grouped Conv in the then-branch, Identity in the else-branch."""
    r = rng(4)
    weight = r.standard_normal((channels, channels // group, 3, 3)).astype(np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "sub_w"], ["t"], name="sub_conv", group=group,
                          pads=[1] * 4)],  # fmt: skip
        "then", [], [tensor_info("t", ["N", channels, 5, 5])], [init("sub_w", weight)],
    )  # fmt: skip
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["e"])],
        "else",
        [],
        [tensor_info("e", ["N", channels, 5, 5])],
    )
    node = helper.make_node("If", ["flag"], ["Y"], name="if", then_branch=then_graph,
                            else_branch=else_graph)  # fmt: skip
    inputs = [
        tensor_info("X", ["N", channels, 5, 5]),
        tensor_info("flag", [], onnx.TensorProto.BOOL),
    ]
    return make_model([node], inputs, [tensor_info("Y", ["N", channels, 5, 5])])


def grouped_convs(model: onnx.ModelProto | ir.Model) -> list[tuple[str, str, int, int]]:
    """(name, op, group, C_in) of every Conv/ConvTranspose with group > 1 (main graph)."""
    found = []
    for op, group, _attrs, weight, _bias, name in _convs(model):
        if group > 1:
            channels_in = weight.shape[1] * group if op == "Conv" else weight.shape[0]
            found.append((name, op, group, channels_in))
    return found


def conv_weights(model: onnx.ModelProto | ir.Model) -> list[tuple]:
    """(op, group, attributes, weight, bias) of every Conv/ConvTranspose, in graph order."""
    return [entry[:5] for entry in _convs(model)]


def _convs(model: onnx.ModelProto | ir.Model) -> list[tuple]:
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
        convs.append((node.op_type, group, attributes, tensors[node.input[1]], bias, node.name))
    return convs


def assert_same_convs(
    expected: onnx.ModelProto | ir.Model, actual: onnx.ModelProto | ir.Model
) -> int:
    """Both models hold the same convolutions in order: op, group, attributes, and bit-equal
    weights and biases. Returns how many."""
    want, got = conv_weights(expected), conv_weights(actual)
    assert [(c[0], c[1], c[2]) for c in got] == [(c[0], c[1], c[2]) for c in want]
    for (_, _, _, w0, b0), (_, _, _, w1, b1) in zip(want, got):
        assert w1.dtype == w0.dtype and w1.shape == w0.shape
        assert w1.tobytes() == w0.tobytes(), "weights differ"
        assert (b0 is None) == (b1 is None)
        if b0 is not None:
            assert b1.tobytes() == b0.tobytes(), "biases differ"
    return len(want)


def ort_run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> dict:
    """onnxruntime (CPU, optimisations off) outputs of ``model`` by name."""
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    if model.ir_version > IR_VERSION:  # onnxruntime reads at most IR 13; copy, then lower
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.ir_version = IR_VERSION
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
    """A fresh copy of :func:`_zoo_model_bytes` (cached: AlexNet's weights take seconds)."""
    return onnx.ModelProto.FromString(_zoo_model_bytes(name, seed))


@functools.lru_cache(maxsize=4)
def _zoo_model_bytes(name: str, seed: int) -> bytes:
    return _randomised_zoo_model(name, seed).SerializeToString()


def _randomised_zoo_model(name: str, seed: int) -> onnx.ModelProto:
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
    graph.output.append(helper.make_tensor_value_info(softmax.input[0], 1, None))
    try:
        logits = ort_run(model, random_feeds(model))[softmax.input[0]]
    finally:
        graph.output.pop()
    factor = target_std / float(np.std(logits))
    for tensor in graph.initializer:
        if tensor.name in producer.input[1:3]:
            scaled = numpy_helper.to_array(tensor) * np.float32(factor)
            tensor.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), tensor.name))
