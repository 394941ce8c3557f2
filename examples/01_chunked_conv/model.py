"""A small ResNeXt-style network whose grouped convolutions are written out as branches.

Each block is what a converter or a ``torch.chunk`` model exports::

    x ─ Conv1x1 ─ BN ─ Relu ─ Split(8) ─ 8 × (Conv3x3 ─ BN ─ Relu) ─ Concat ─ Conv1x1 ─ BN ─ Add(x) ─ Relu

The fold pass turns each Split ─ 8 branches ─ Concat into one ``Conv(group=8)`` followed by one Relu.
Run ``python model.py OUT.onnx`` to write it.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # what onnxruntime 1.31 reads (it stops at 13; onnx 1.23 writes 14)


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)
        b = self.rng.standard_normal(cout) * 0.1
        out = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const("w", w), self.const("b", b)], [out], name=out,
            kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group,
        ))  # fmt: skip
        return out

    def bn(self, x: str, c: int) -> str:
        out = self.name("bn")
        params = [
            self.const("gamma", self.rng.uniform(0.5, 1.5, c)),
            self.const("beta", self.rng.standard_normal(c) * 0.1),
            self.const("mean", self.rng.standard_normal(c) * 0.1),
            self.const("var", self.rng.uniform(0.5, 1.5, c)),
        ]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *params], [out], name=out))
        return out

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def branchy_block(self, x: str, channels: int, width: int, cardinality: int) -> str:
        h = self.op("Relu", [self.bn(self.conv(x, channels, width, 1), width)])
        parts = [self.name("part") for _ in range(cardinality)]
        sizes = self.name("split_sizes")
        self.inits.append(numpy_helper.from_array(
            np.full(cardinality, width // cardinality, np.int64), sizes))  # fmt: skip
        self.nodes.append(
            helper.make_node("Split", [h, sizes], parts, axis=1, name=self.name("split"))
        )
        per = width // cardinality
        branches = [self.op("Relu", [self.bn(self.conv(p, per, per, 3), per)]) for p in parts]
        h = self.op("Concat", branches, axis=1)
        h = self.bn(self.conv(h, width, channels, 1), channels)
        return self.op("Relu", [self.op("Add", [h, x])])


def build_model(
    *, channels: int = 64, width: int = 64, cardinality: int = 8, blocks: int = 3,
    size: int = 28, seed: int = 0,
) -> onnx.ModelProto:  # fmt: skip
    """The branchy ResNeXt-style model, batch dimension symbolic."""
    b = _Builder(seed)
    h = b.op("Relu", [b.conv("image", 3, channels, 3)])
    for _ in range(blocks):
        h = b.branchy_block(h, channels, width, cardinality)
    pooled = b.op("GlobalAveragePool", [h])
    flat = b.op("Flatten", [pooled])
    fc_w = b.const("fc_w", b.rng.standard_normal((10, channels)) * 0.1)
    b.nodes.append(helper.make_node("Gemm", [flat, fc_w], ["logits"], transB=1, name="fc"))
    graph = helper.make_graph(
        b.nodes, "chunked_resnext",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        b.inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="gconv-compile-example"
    )
    model.ir_version = IR_VERSION
    model.doc_string = "Branchy ResNeXt-style example for gconv-compile"
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    onnx.save(build_model(), sys.argv[1] if len(sys.argv) > 1 else "chunked_resnext.onnx")
