"""ResNeXt-50 32x4d as an ONNX model built with onnx.helper (batch norm folded into the convs).

Two forms of the same network, with the same weights:

- ``grouped``: every 3x3 bottleneck conv is one ``Conv(group=32)``;
- ``branchy``: every such conv is ``Split -> 32 Conv -> Concat`` (how some exporters and
  hand-written models spell it), which ``FoldSplitConvConcat`` folds back into the grouped form.

Weights are seeded random with a He-like scale so activations stay in range through 16 blocks.
With ``bn=True`` the convolutions have no bias and each is followed by a
``BatchNormalization`` node (seeded random scale, shift and running statistics), as exporters
write a network whose batch norm was not folded; in the branchy form the batch norm follows the
Concat, as torchvision's ``bn2`` follows the grouped ``conv2``.
``stage_convs()`` lists the distinct grouped conv shapes of the network, for per-conv benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10  # onnxruntime reads at most IR 13; onnx 1.23 writes 14 by default

STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))  # (blocks, planes) as in torchvision
GROUPS = 32
WIDTH_PER_GROUP = 4
EXPANSION = 4


@dataclass(frozen=True)
class ConvShape:
    """One convolution of the network: NCHW input, OIHW weight, stride, pad, group."""

    name: str
    in_channels: int
    out_channels: int
    size: int  # input height = width
    kernel: int
    stride: int
    group: int

    @property
    def pad(self) -> int:
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.pad - self.kernel) // self.stride + 1

    @property
    def macs(self) -> int:
        return (
            self.out_channels * self.out_size**2 * (self.in_channels // self.group) * self.kernel**2
        )


class _Builder:
    def __init__(self, form: str, seed: int, bn: bool = False):
        if form not in ("grouped", "branchy"):
            raise ValueError(f"form must be 'grouped' or 'branchy', not {form!r}")
        self.form = form
        self.bn = bn
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.convs: list[ConvShape] = []

    def _const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def conv(self, x: str, shape: ConvShape, *, relu: bool) -> str:
        """Conv (+ folded BN as bias) (+ Relu); grouped convs split into branches if branchy."""
        self.convs.append(shape)
        c_in, c_out, k, g = shape.in_channels, shape.out_channels, shape.kernel, shape.group
        fan_in = (c_in // g) * k * k
        weight = self.rng.standard_normal((c_out, c_in // g, k, k)).astype(np.float32)
        weight *= np.float32(np.sqrt(2.0 / fan_in))
        bias = (0.1 * self.rng.standard_normal(c_out)).astype(np.float32)
        if self.bn:
            bn_params = self._batch_norm_params(c_out)
        attrs = dict(kernel_shape=[k, k], strides=[shape.stride] * 2, pads=[shape.pad] * 4)
        out = f"{shape.name}_out"
        if g > 1 and self.form == "branchy":
            parts = [f"{shape.name}_in{i}" for i in range(g)]
            sizes = self._const(f"{shape.name}_split", np.full(g, c_in // g, np.int64))
            self.nodes.append(
                helper.make_node("Split", [x, sizes], parts, axis=1, name=f"{shape.name}_split")
            )
            step = c_out // g
            outs = []
            for i, part in enumerate(parts):
                w = self._const(f"{shape.name}_w{i}", weight[i * step : (i + 1) * step])
                inputs = [part, w]
                if not self.bn:
                    inputs.append(
                        self._const(f"{shape.name}_b{i}", bias[i * step : (i + 1) * step])
                    )
                outs.append(f"{shape.name}_c{i}")
                self.nodes.append(
                    helper.make_node("Conv", inputs, [outs[-1]], name=f"{shape.name}_{i}", **attrs)
                )
            self.nodes.append(
                helper.make_node("Concat", outs, [out], axis=1, name=f"{shape.name}_concat")
            )
        else:
            inputs = [x, self._const(f"{shape.name}_w", weight)]
            if not self.bn:
                inputs.append(self._const(f"{shape.name}_b", bias))
            self.nodes.append(
                helper.make_node("Conv", inputs, [out], name=shape.name, group=g, **attrs)
            )
        if self.bn:
            names = [self._const(f"{shape.name}_bn_{k}", v) for k, v in bn_params.items()]
            self.nodes.append(
                helper.make_node(
                    "BatchNormalization", [out, *names], [f"{out}_bn"], name=f"{shape.name}_bn"
                )
            )
            out = f"{out}_bn"
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"{out}_relu"]))
            out = f"{out}_relu"
        return out

    def _batch_norm_params(self, channels: int) -> dict[str, np.ndarray]:
        """Scale, shift, running mean and variance of one batch norm (seeded random)."""
        rng = self.rng
        return {
            "scale": (1.0 + 0.1 * rng.standard_normal(channels)).astype(np.float32),
            "shift": (0.1 * rng.standard_normal(channels)).astype(np.float32),
            "mean": (0.1 * rng.standard_normal(channels)).astype(np.float32),
            "var": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        }

    def bottleneck(self, x: str, name: str, c_in: int, planes: int, size: int, stride: int) -> str:
        width = planes * WIDTH_PER_GROUP * GROUPS // 64
        c_out = planes * EXPANSION
        h = self.conv(x, ConvShape(f"{name}_conv1", c_in, width, size, 1, 1, 1), relu=True)
        h = self.conv(
            h, ConvShape(f"{name}_conv2", width, width, size, 3, stride, GROUPS), relu=True
        )
        h = self.conv(
            h, ConvShape(f"{name}_conv3", width, c_out, size // stride, 1, 1, 1), relu=False
        )
        if stride != 1 or c_in != c_out:
            x = self.conv(x, ConvShape(f"{name}_down", c_in, c_out, size, 1, stride, 1), relu=False)
        self.nodes.append(helper.make_node("Add", [h, x], [f"{name}_sum"]))
        self.nodes.append(helper.make_node("Relu", [f"{name}_sum"], [f"{name}_out"]))
        return f"{name}_out"


def build_resnext50(
    form: str = "grouped", *, seed: int = 0, batch: int = 1, size: int = 224, bn: bool = False
) -> onnx.ModelProto:
    """ResNeXt-50 32x4d in ``form`` 'grouped' or 'branchy'; same weights for one seed.

    ``bn``: BatchNormalization nodes after bias-free convs, instead of batch norm folded into
    the convs' biases.
    """
    b = _Builder(form, seed, bn)
    x = b.conv("input", ConvShape("stem", 3, 64, size, 7, 2, 1), relu=True)
    b.nodes.append(
        helper.make_node(
            "MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    x, c_in, spatial = "pool", 64, size // 4
    for stage, (blocks, planes) in enumerate(STAGES):
        for block in range(blocks):
            stride = 2 if (block == 0 and stage > 0) else 1
            x = b.bottleneck(x, f"s{stage + 1}b{block}", c_in, planes, spatial, stride)
            c_in, spatial = planes * EXPANSION, spatial // stride
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    b.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    fc_w = (b.rng.standard_normal((1000, c_in)) / np.sqrt(c_in)).astype(np.float32)
    b._const("fc_w", fc_w)
    b._const("fc_b", (0.1 * b.rng.standard_normal(1000)).astype(np.float32))
    b.nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(
        b.nodes,
        f"resnext50_32x4d_{form}" + ("_bn" if bn else ""),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1000])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def stage_convs(size: int = 224) -> list[ConvShape]:
    """The distinct grouped 3x3 convs of ResNeXt-50 32x4d (one per stage and stride)."""
    spatial, seen, out = size // 4, set(), []
    for stage, (blocks, planes) in enumerate(STAGES):
        for block in range(blocks):
            stride = 2 if (block == 0 and stage > 0) else 1
            width = planes * WIDTH_PER_GROUP * GROUPS // 64
            key = (width, spatial, stride)
            if key not in seen:
                seen.add(key)
                out.append(
                    ConvShape(
                        f"s{stage + 1}_gconv_s{stride}", width, width, spatial, 3, stride, GROUPS
                    )
                )
            spatial //= stride
    return out


def single_conv_model(shape: ConvShape, *, seed: int = 0, relu: bool = True) -> onnx.ModelProto:
    """One conv (with bias, optional Relu) as a model, input named 'input'."""
    b = _Builder("grouped", seed)
    y = b.conv("input", shape, relu=relu)
    graph = helper.make_graph(
        b.nodes,
        shape.name,
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, [1, shape.in_channels, shape.size, shape.size]
            )
        ],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model
