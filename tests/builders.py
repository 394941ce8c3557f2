"""Model builders shared by the tests: small graphs with seeded random weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10  # onnxruntime reads at most 13; onnx 1.23 would write 14


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_model(
    nodes, inputs, outputs, initializers=(), *, opset: int = OPSET, value_info=(), name="g",
    functions=(), extra_opsets=(),
) -> onnx.ModelProto:  # fmt: skip
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))  # fmt: skip
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def tensor_info(name: str, shape: Sequence, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def ints(name: str, values: Sequence[int]) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def split_conv_concat(
    *,
    channels: int = 8,
    groups: int = 2,
    out_per_branch: int = 4,
    kernel: Sequence[int] = (3, 3),
    spatial: Sequence[int] = (6, 6),
    batch="N",
    split_form: str = "split13",
    bias: bool = True,
    conv_attrs: dict | None = None,
    branch_group: int = 1,
    activation: str | None = None,
    batch_norm: bool = False,
    shared_weight: bool = False,
    opset: int | None = None,
    seed: int = 0,
    transpose: bool = False,
) -> onnx.ModelProto:
    """X -> split on channels -> `groups` Convs -> Concat(axis=1) -> Y."""
    r = rng(seed)
    width = channels // groups
    op = "ConvTranspose" if transpose else "Conv"
    nodes, inits = [], []
    parts = [f"x{i}" for i in range(groups)]
    opset = opset or {"split11": 11, "split13": 13, "split18": 18, "slice": 13}.get(split_form, 13)
    if split_form == "split11":
        nodes.append(helper.make_node("Split", ["X"], parts, axis=1, split=[width] * groups))
    elif split_form == "split13":
        inits.append(ints("split_sizes", [width] * groups))
        nodes.append(helper.make_node("Split", ["X", "split_sizes"], parts, axis=1))
    elif split_form == "split18":
        nodes.append(helper.make_node("Split", ["X"], parts, axis=1, num_outputs=groups))
    elif split_form == "slice":
        inits += [ints("axes", [1])]
        for i in range(groups):
            inits += [ints(f"s{i}", [i * width]), ints(f"e{i}", [(i + 1) * width])]
            nodes.append(helper.make_node("Slice", ["X", f"s{i}", f"e{i}", "axes"], [parts[i]]))
    else:
        raise ValueError(split_form)
    rank = len(kernel)
    shared = None
    outs = []
    for i in range(groups):
        if transpose:
            wshape = (width, out_per_branch // branch_group, *kernel)
        else:
            wshape = (out_per_branch, width // branch_group, *kernel)
        w = shared if (shared_weight and shared is not None) else r.standard_normal(wshape).astype(np.float32)
        shared = w
        inits.append(init(f"w{i}", w))
        conv_in = [parts[i], f"w{i}"]
        if bias:
            inits.append(init(f"b{i}", r.standard_normal(out_per_branch).astype(np.float32)))
            conv_in.append(f"b{i}")
        attrs = {"group": branch_group} if branch_group != 1 else {}
        attrs.update(conv_attrs or {"pads": [1] * (2 * rank)} if not transpose else conv_attrs or {})
        out = f"c{i}"
        nodes.append(helper.make_node(op, conv_in, [out], name=f"conv{i}", **attrs))
        if batch_norm:
            for p, fn in (("scale", lambda: r.uniform(0.5, 1.5, out_per_branch)),
                          ("bias", lambda: r.standard_normal(out_per_branch)),
                          ("mean", lambda: r.standard_normal(out_per_branch)),
                          ("var", lambda: r.uniform(0.5, 2.0, out_per_branch))):  # fmt: skip
                inits.append(init(f"bn{i}_{p}", fn().astype(np.float32)))
            nodes.append(helper.make_node(
                "BatchNormalization", [out] + [f"bn{i}_{p}" for p in ("scale", "bias", "mean", "var")],
                [f"bn{i}"], epsilon=1e-3))  # fmt: skip
            out = f"bn{i}"
        if activation:
            kwargs = {"alpha": 0.1} if activation == "LeakyRelu" else {}
            nodes.append(helper.make_node(activation, [out], [f"a{i}"], **kwargs))
            out = f"a{i}"
        outs.append(out)
    nodes.append(helper.make_node("Concat", outs, ["Y"], axis=1, name="concat"))
    x = tensor_info("X", [batch, channels, *spatial])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, None, *([None] * len(spatial))])
    return make_model(nodes, [x], [y], inits, opset=opset)
