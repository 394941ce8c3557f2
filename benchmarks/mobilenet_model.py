"""MobileNetV2 (width 1.0, 224x224) as an ONNX model built with onnx.helper, batch norm folded.

The torchvision architecture: a 3x3 stride-2 stem, 17 inverted residual blocks (1x1 expand,
3x3 depthwise, 1x1 project; ReLU6 after the first two; a residual add where stride 1 keeps the
width), a 1x1 conv to 1280, global average pool and a 1000-way Gemm. Weights are seeded random
with a He-like scale; ReLU6 is ``Clip(0, 6)``. ``depthwise_convs()`` lists its distinct depthwise
convs for per-conv benchmarks.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from resnext_model import IR_VERSION, OPSET, ConvShape

# (expansion t, output channels c, blocks n, first stride s), as in the MobileNetV2 paper
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits = [
            numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"),
            numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max"),
        ]

    def conv(self, x: str, shape: ConvShape, name: str, relu6: bool) -> str:
        fan_in = shape.in_channels // shape.group * shape.kernel**2
        w = self.rng.standard_normal(
            (shape.out_channels, shape.in_channels // shape.group, shape.kernel, shape.kernel)
        ) * np.sqrt(2.0 / fan_in)
        b = 0.1 * self.rng.standard_normal(shape.out_channels)
        self.inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}_w"))
        self.inits.append(numpy_helper.from_array(b.astype(np.float32), f"{name}_b"))
        self.nodes.append(
            helper.make_node(
                "Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_conv"],
                kernel_shape=[shape.kernel] * 2, strides=[shape.stride] * 2,
                pads=[shape.pad] * 4, group=shape.group,
            )
        )  # fmt: skip
        if not relu6:
            return f"{name}_conv"
        self.nodes.append(
            helper.make_node("Clip", [f"{name}_conv", "relu6_min", "relu6_max"], [f"{name}_relu6"])
        )
        return f"{name}_relu6"


def _blocks(size: int = 224):
    """(name, c_in, hidden, c_out, input size, stride) of every inverted residual block."""
    c_in, spatial, out = 32, size // 2, []
    for stage, (t, c, n, s) in enumerate(SETTINGS):
        for i in range(n):
            stride = s if i == 0 else 1
            out.append((f"b{stage}_{i}", c_in, c_in * t, c, spatial, stride))
            c_in, spatial = c, spatial // stride
    return out


def build_mobilenet_v2(*, seed: int = 0, size: int = 224) -> onnx.ModelProto:
    """MobileNetV2, batch 1, ``size`` x ``size``, BN folded, weights from ``seed``."""
    b = _Builder(seed)
    x = b.conv("input", ConvShape("stem", 3, 32, size, 3, 2, 1), "stem", relu6=True)
    for name, c_in, hidden, c_out, spatial, stride in _blocks(size):
        h = x
        if hidden != c_in:
            h = b.conv(h, ConvShape("", c_in, hidden, spatial, 1, 1, 1), f"{name}_expand", True)
        h = b.conv(h, ConvShape("", hidden, hidden, spatial, 3, stride, hidden), f"{name}_dw", True)
        h = b.conv(h, ConvShape("", hidden, c_out, spatial // stride, 1, 1, 1), f"{name}_proj", False)  # fmt: skip
        if stride == 1 and c_in == c_out:
            b.nodes.append(helper.make_node("Add", [h, x], [f"{name}_sum"]))
            h = f"{name}_sum"
        x = h
    x = b.conv(x, ConvShape("head", 320, 1280, size // 32, 1, 1, 1), "head", relu6=True)
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    b.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    fc_w = b.rng.standard_normal((1000, 1280)) / np.sqrt(1280)
    b.inits.append(numpy_helper.from_array(fc_w.astype(np.float32), "fc_w"))
    b.inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b"))
    b.nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(
        b.nodes, "mobilenet_v2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        b.inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def depthwise_convs(size: int = 224) -> list[ConvShape]:
    """The distinct depthwise 3x3 convs of MobileNetV2 (channels, input size, stride)."""
    seen, out = set(), []
    for _, _, hidden, _, spatial, stride in _blocks(size):
        if (hidden, spatial, stride) not in seen:
            seen.add((hidden, spatial, stride))
            out.append(
                ConvShape(
                    f"mbv2_dw{hidden}_{spatial}_s{stride}",
                    hidden,
                    hidden,
                    spatial,
                    3,
                    stride,
                    hidden,
                )  # fmt: skip
            )
    return out
