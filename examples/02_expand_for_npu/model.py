"""A MobileNet/ShuffleNet-style block with grouped and depthwise convolutions.

    x ─ Conv1x1(group=4) ─ Relu ─ DepthwiseConv3x3(group=C) ─ Conv1x1(group=4) ─ Add(x) ─ Relu

Run ``python model.py OUT.onnx`` to write it.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13


def build_model(channels: int = 32, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(x: str, name: str, group: int, kernel: int) -> str:
        shape = (channels, channels // group, kernel, kernel)
        weight = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"{name}.w"))
        inits.append(
            numpy_helper.from_array(
                rng.standard_normal(channels).astype(np.float32) * 0.1, f"{name}.b"
            )
        )
        nodes.append(helper.make_node(
            "Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, group=group,
            pads=[kernel // 2] * 4,
        ))  # fmt: skip
        return name

    h = conv("image", "reduce_g4", 4, 1)
    nodes.append(helper.make_node("Relu", [h], ["reduce_relu"], name="reduce_relu"))
    h = conv("reduce_relu", "depthwise", channels, 3)
    h = conv(h, "expand_g4", 4, 1)
    nodes.append(helper.make_node("Add", [h, "image"], ["sum"], name="residual"))
    nodes.append(helper.make_node("Relu", ["sum"], ["out"], name="out_relu"))
    graph = helper.make_graph(
        nodes, "grouped_block",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", channels, size, size])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    onnx.save(build_model(), sys.argv[1] if len(sys.argv) > 1 else "grouped_block.onnx")
