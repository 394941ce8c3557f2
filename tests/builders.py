"""Model builders shared by the tests: small graphs with seeded random weights.

Also the fold pass tests' model and check helpers (``block_model``, ``assert_folds``,
``assert_refused``), which four test modules share. The module is a little over 600 lines
because the house style keeps the tests' shared builders in this one helper module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from gconv_compile.passes import FoldSplitConvConcat
from gconv_compile.passes._common import const_array
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
    parts = [f"x{i}" for i in range(groups)]
    opset = opset or {"split11": 11, "split13": 13, "split18": 18, "slice": 13}.get(split_form, 13)
    nodes, inits = _channel_parts("X", parts, width, split_form)
    rank = len(kernel)
    shared = None
    outs = []
    for i in range(groups):
        if transpose:
            wshape = (width, out_per_branch // branch_group, *kernel)
        else:
            wshape = (out_per_branch, width // branch_group, *kernel)
        w = (
            shared
            if (shared_weight and shared is not None)
            else r.standard_normal(wshape).astype(np.float32)
        )
        shared = w
        inits.append(init(f"w{i}", w))
        conv_in = [parts[i], f"w{i}"]
        if bias:
            inits.append(init(f"b{i}", r.standard_normal(out_per_branch).astype(np.float32)))
            conv_in.append(f"b{i}")
        attrs = {"group": branch_group} if branch_group != 1 else {}
        attrs.update(
            conv_attrs or {"pads": [1] * (2 * rank)} if not transpose else conv_attrs or {}
        )
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
    y = helper.make_tensor_value_info(
        "Y", TensorProto.FLOAT, [batch, None, *([None] * len(spatial))]
    )
    return make_model(nodes, [x], [y], inits, opset=opset)


def _channel_parts(x: str, parts: list[str], width: int, split_form: str) -> tuple[list, list]:
    """(nodes, initializers) splitting ``x`` into ``parts`` of ``width`` channels each."""
    nodes, inits = [], []
    groups = len(parts)
    if split_form == "split11":
        nodes.append(helper.make_node("Split", [x], parts, axis=1, split=[width] * groups))
    elif split_form == "split13":
        inits.append(ints("split_sizes", [width] * groups))
        nodes.append(helper.make_node("Split", [x, "split_sizes"], parts, axis=1))
    elif split_form == "split18":
        nodes.append(helper.make_node("Split", [x], parts, axis=1, num_outputs=groups))
    elif split_form == "slice":
        inits += [ints("axes", [1])]
        for i in range(groups):
            inits += [ints(f"s{i}", [i * width]), ints(f"e{i}", [(i + 1) * width])]
            nodes.append(helper.make_node("Slice", [x, f"s{i}", f"e{i}", "axes"], [parts[i]]))
    else:
        raise ValueError(split_form)
    return nodes, inits


# ------------------------------------------------------------------------------------------
# Incremental builder for the fold pass tests: any split form, per-branch Conv settings,
# weights as initializers or Constant nodes, blocks inside subgraphs and functions.

INT64_MAX = np.iinfo(np.int64).max

# Activation name -> (attributes, constant extra inputs). Parameters differ from the defaults so
# that dropping an attribute or an input during a rewrite changes the numbers.
ACTIVATIONS: dict[str, tuple[dict, tuple]] = {
    "Relu": ({}, ()),
    "LeakyRelu": ({"alpha": 0.2}, ()),
    "Sigmoid": ({}, ()),
    "Tanh": ({}, ()),
    "Clip": ({}, (np.float32(-0.5), np.float32(0.7))),
    "HardSwish": ({}, ()),
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, ()),
    "Elu": ({"alpha": 0.5}, ()),
    "Softplus": ({}, ()),
}


class GraphBuilder:
    """Collects nodes and initializers for one graph; names are fresh and deterministic.

    Child builders (``child()``) share the name counter and the random generator, so a subgraph
    or function body can be built with names that never collide with the parent's.
    """

    def __init__(self, seed: int = 0, *, _parent: GraphBuilder | None = None) -> None:
        self.rng = _parent.rng if _parent else rng(seed)
        self._counter = _parent._counter if _parent else {}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def child(self) -> GraphBuilder:
        return GraphBuilder(_parent=self)

    def fresh(self, prefix: str) -> str:
        index = self._counter.get(prefix, 0)
        self._counter[prefix] = index + 1
        return f"{prefix}{index}"

    def const(self, array, prefix: str = "k", *, as_node: bool = False) -> str:
        """An initializer, or a Constant node when ``as_node`` (function bodies have no initializers)."""
        name = self.fresh(prefix)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if as_node:
            self.nodes.append(
                helper.make_node("Constant", [], [name], value=tensor, name=f"{name}_node")
            )
        else:
            self.initializers.append(tensor)
        return name

    def int64(self, values, prefix: str = "i", *, as_node: bool = False) -> str:
        return self.const(np.asarray(values, dtype=np.int64), prefix, as_node=as_node)

    def random(self, shape, prefix: str = "w", *, as_node: bool = False) -> str:
        return self.const(
            self.rng.standard_normal(shape).astype(np.float32), prefix, as_node=as_node
        )

    def op(
        self,
        op_type: str,
        inputs,
        *,
        outputs: int = 1,
        name: str | None = None,
        out: str | None = None,
        **attrs,
    ):
        """Add a node; returns its output name (``out`` if given), or the list when ``outputs > 1``."""
        names = [out] if out else [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), names, name=name or self.fresh(f"{op_type}_"), **attrs
            )
        )
        return names[0] if outputs == 1 else names

    def conv(
        self,
        x: str,
        c_in: int,
        c_out: int,
        kernel: Sequence[int],
        *,
        group: int = 1,
        bias: bool = True,
        transpose: bool = False,
        weight: str | None = None,
        as_node: bool = False,
        consts: GraphBuilder | None = None,
        **attrs,
    ) -> str:
        """Conv (weight [c_out, c_in/g, k...]) or ConvTranspose (weight [c_in, c_out/g, k...])."""
        consts = consts or self
        if weight is None:
            shape = (
                (c_in, c_out // group, *kernel) if transpose else (c_out, c_in // group, *kernel)
            )
            weight = consts.random(shape, "w", as_node=as_node)
        inputs = [x, weight]
        if bias:
            inputs.append(consts.random((c_out,), "b", as_node=as_node))
        if group != 1:
            attrs["group"] = group
        return self.op(
            "ConvTranspose" if transpose else "Conv", inputs, name=self.fresh("conv"), **attrs
        )

    def batch_norm(
        self,
        x: str,
        channels: int,
        *,
        as_node: bool = False,
        consts: GraphBuilder | None = None,
        **attrs,
    ) -> str:
        consts = consts or self
        r = self.rng
        draws = (
            ("bn_scale", lambda: r.uniform(0.5, 1.5, channels)),
            ("bn_bias", lambda: r.standard_normal(channels)),
            ("bn_mean", lambda: r.standard_normal(channels)),
            ("bn_var", lambda: r.uniform(0.5, 2.0, channels)),
        )  # drawn in this order: the models stay the same as when the tests were written
        params = [consts.const(d().astype(np.float32), k, as_node=as_node) for k, d in draws]
        attrs.setdefault("epsilon", 1e-3)
        return self.op("BatchNormalization", [x, *params], **attrs)

    def activation(
        self, x: str, spec, *, as_node: bool = False, consts: GraphBuilder | None = None
    ) -> str:
        """``spec``: an ACTIVATIONS name, or (op_type, attributes, extra constant inputs)."""
        consts = consts or self
        op_type, attrs, extras = (spec, *ACTIVATIONS[spec]) if isinstance(spec, str) else spec
        inputs = [x] + [consts.const(np.asarray(e), "act_param", as_node=as_node) for e in extras]
        return self.op(op_type, inputs, **attrs)

    def split(
        self, x: str, sizes: Sequence[int], *, form: str, axis: int = 1, as_node: bool = False
    ) -> list[str]:
        """Split ``x`` with the given sizes, in one of the Split encodings.

        Forms: ``split11`` (attribute), ``split13`` (input), ``split18`` (``num_outputs``),
        ``equal`` (no sizes at all: the opset decides the equal parts).
        """
        n = len(sizes)
        if form == "split11":
            return self.op("Split", [x], outputs=n, axis=axis, split=list(sizes))
        if form == "split13":
            return self.op(
                "Split", [x, self.int64(sizes, "split", as_node=as_node)], outputs=n, axis=axis
            )
        if form == "split18":
            return self.op("Split", [x], outputs=n, axis=axis, num_outputs=n)
        if form == "equal":
            return self.op("Split", [x], outputs=n, axis=axis)
        raise ValueError(form)

    def slice(
        self,
        x: str,
        start: int,
        end: int,
        *,
        axis: int = 1,
        step: int | None = None,
        as_node: bool = False,
    ) -> str:
        inputs = [
            x,
            self.int64([start], "start", as_node=as_node),
            self.int64([end], "end", as_node=as_node),
            self.int64([axis], "axes", as_node=as_node),
        ]
        if step is not None:
            inputs.append(self.int64([step], "steps", as_node=as_node))
        return self.op("Slice", inputs)

    def chunk_slices(self, x: str, n: int, *, axis: int = 1) -> list[str]:
        """Slices with bounds computed from Shape(x) at run time, like TorchScript's torch.chunk.

        chunk = (C + n - 1) / n; part i = x[:, chunk*i : chunk*(i+1)] (the last ends at INT64_MAX).
        """
        shape = self.op("Shape", [x])
        channels = self.op(
            "Gather", [shape, self.const(np.array(axis, np.int64), "axis_index")], axis=0
        )
        rounded = self.op("Add", [channels, self.const(np.array(n - 1, np.int64), "n_minus_1")])
        chunk = self.op("Div", [rounded, self.const(np.array(n, np.int64), "n")])
        zero = self.int64([0], "unsqueeze_axes")
        parts = []
        for i in range(n):
            start = self.op("Mul", [chunk, self.const(np.array(i, np.int64), "index")])
            if i == n - 1:
                end = self.int64([INT64_MAX], "int64_max")
            else:
                stop = self.op("Mul", [chunk, self.const(np.array(i + 1, np.int64), "index")])
                end = self.op("Unsqueeze", [stop, zero])
            parts.append(
                self.op(
                    "Slice",
                    [x, self.op("Unsqueeze", [start, zero]), end, self.int64([axis], "axes")],
                )
            )
        return parts

    def graph(self, inputs, outputs, name: str = "g") -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, list(inputs), list(outputs), self.initializers)

    def model(self, inputs, outputs, *, opset: int = OPSET, **kwargs) -> onnx.ModelProto:
        return make_model(self.nodes, inputs, outputs, self.initializers, opset=opset, **kwargs)


def conv_block(
    b: GraphBuilder,
    x: str,
    *,
    channels: int,
    n: int = 2,
    form: str = "split13",
    sizes: Sequence[int] | None = None,
    ranges: Sequence[tuple[int, int]] | None = None,
    out_per_branch: int = 4,
    kernel: Sequence[int] = (3, 3),
    conv_attrs: dict | None = None,
    group: int = 1,
    bias: bool = True,
    batch_norm: bool = False,
    activation=None,
    transpose: bool = False,
    as_node: bool = False,
    shared_weight: bool = False,
    concat_axis: int = 1,
    concat_order: Sequence[int] | None = None,
    overrides: Sequence[dict] | None = None,
    consts: GraphBuilder | None = None,
    output: str | None = None,
) -> str:
    """Split ``x`` (``channels`` on axis 1) into branches of Conv [-> BN] [-> act], then Concat.

    ``form`` picks the splitter: a Split form of ``GraphBuilder.split``, or ``slice`` (initializer
    bounds), ``slice_node`` (Constant-node bounds), ``slice_negative`` (axis -rank+1, negative
    bounds, the last end INT64_MAX) or ``chunk`` (bounds from Shape arithmetic). ``ranges``
    gives explicit [start, stop) channel ranges for the slice forms. ``overrides[i]`` replaces
    any of kernel, conv_attrs, group, bias, batch_norm, activation, out_per_branch for branch i.
    Default Conv attributes are centred 'same' pads. Returns the Concat output name (``output``
    if given).
    """
    consts = consts or b
    rank = len(kernel) + 2
    if ranges is None:
        sizes = list(sizes or [channels // n] * n)
        bounds = np.cumsum([0, *sizes])
        ranges = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    n = len(ranges)
    parts = _block_parts(b, x, form, ranges, channels=channels, rank=rank, as_node=as_node)
    defaults = {
        "kernel": kernel,
        "conv_attrs": conv_attrs,
        "group": group,
        "bias": bias,
        "batch_norm": batch_norm,
        "activation": activation,
        "out_per_branch": out_per_branch,
    }
    outs = []
    weight = None
    for i, (part, (lo, hi)) in enumerate(zip(parts, ranges)):
        spec = {**defaults, **(overrides or [{}] * n)[i]}
        k = tuple(spec["kernel"])
        if shared_weight and weight is None:
            out_channels, g = spec["out_per_branch"], spec["group"]
            shape = (
                (hi - lo, out_channels // g, *k)
                if transpose
                else (out_channels, (hi - lo) // g, *k)
            )
            weight = consts.random(shape, "w_shared", as_node=as_node)
        outs.append(
            _block_branch(b, part, hi - lo, spec, transpose=transpose, weight=weight,
                          as_node=as_node, consts=consts)
        )  # fmt: skip
    order = list(concat_order) if concat_order is not None else list(range(n))
    return b.op(
        "Concat", [outs[i] for i in order], axis=concat_axis, name=b.fresh("concat"), out=output
    )


def _block_parts(
    b: GraphBuilder, x: str, form: str, ranges, *, channels: int, rank: int, as_node: bool
) -> list[str]:
    """The splitter of :func:`conv_block`: one value per channel range of ``x``."""
    if form.startswith("split") or form == "equal":
        return b.split(x, [hi - lo for lo, hi in ranges], form=form, as_node=as_node)
    if form in ("slice", "slice_node"):
        return [b.slice(x, lo, hi, as_node=as_node or form == "slice_node") for lo, hi in ranges]
    if form == "slice_negative":
        return [
            b.slice(
                x,
                lo - channels,
                INT64_MAX if hi == channels else hi - channels,
                axis=1 - rank,
                as_node=as_node,
            )
            for lo, hi in ranges
        ]
    if form == "chunk":
        return b.chunk_slices(x, len(ranges))
    raise ValueError(form)


def _block_branch(
    b: GraphBuilder, part: str, width: int, spec: dict, *, transpose: bool, weight: str | None,
    as_node: bool, consts: GraphBuilder,
) -> str:  # fmt: skip
    """One branch of :func:`conv_block`: Conv [-> BatchNormalization] [-> activation]."""
    k = tuple(spec["kernel"])
    attrs = spec["conv_attrs"]
    if attrs is None:
        attrs = {} if transpose else {"pads": [(d - 1) // 2 for d in k] * 2}
    out_channels = spec["out_per_branch"]
    value = b.conv(
        part,
        width,
        out_channels,
        k,
        group=spec["group"],
        bias=spec["bias"],
        transpose=transpose,
        weight=weight,
        as_node=as_node,
        consts=consts,
        **attrs,
    )
    if spec["batch_norm"]:
        value = b.batch_norm(value, out_channels, as_node=as_node, consts=consts)
    if spec["activation"] is not None:
        value = b.activation(value, spec["activation"], as_node=as_node, consts=consts)
    return value


def any_tensor(name: str, rank: int = 4, dtype=TensorProto.FLOAT):
    """A value_info of known rank and unknown dims (graph outputs whose shape is left open)."""
    return helper.make_tensor_value_info(name, dtype, [None] * rank)


# ------------------------------------------------------------------------------------------
# The fold pass tests' models and checks (tests/test_fold_split_conv_concat.py and
# tests/test_passes_fold_*.py).

CONV_OPS = ("Conv", "ConvTranspose")
# X with a symbolic channel dim, and the sizes onnxruntime runs it with.
SYMBOLIC_C = ["N", "C", 7, 6]
SYMBOLIC_C_FEED = {"X": [2, 8, 7, 6]}


def kernel_override(kernel, **attrs) -> dict:
    """A ``conv_block`` override: this branch's kernel, and its Conv attributes if given."""
    return {"kernel": kernel, "conv_attrs": attrs or None}


def block_model(*, channels=8, spatial=None, batch="N", opset=None, seed=0, x_shape=None, **block):
    """X -> conv_block(...) -> Y as a model; the opset follows the split form unless given."""
    b = GraphBuilder(seed)
    conv_block(b, "X", channels=channels, output="Y", **block)
    rank = len(block.get("kernel", (3, 3)))
    spatial = spatial or (7, 6, 5)[:rank]
    opset = opset or {"split11": 11, "split18": 18}.get(block.get("form", "split13"), 17)
    shape = x_shape or [batch, channels, *spatial]
    return b.model([tensor_info("X", shape)], [any_tensor("Y", len(shape))], opset=opset)


def run_fold(proto: onnx.ModelProto, **options) -> tuple[ir.passes.PassResult, FoldSplitConvConcat]:
    model = ir.serde.deserialize_model(proto)
    fold_pass = FoldSplitConvConcat(**options)
    return fold_pass(model), fold_pass


def serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def assert_one_conv(
    graph, *, group, weight_shape, op="Conv", output="Y", activation=None, keep=()
) -> ir.Node:
    """The graph holds exactly one Conv/ConvTranspose, folded as expected, feeding ``output``."""
    ops = [node.op_type for node in graph]
    convs = [node for node in graph if node.op_type in CONV_OPS]
    assert [c.op_type for c in convs] == [op], ops
    for gone in ("Split", "Concat"):
        if gone not in keep:
            assert gone not in ops, ops
    conv = convs[0]
    assert conv.attributes["group"].as_int() == group
    assert not dead_initializers(graph)
    weight = const_array(conv.inputs[1])
    assert weight is not None and list(weight.shape) == list(weight_shape)
    if output is not None:
        (out,) = [v for v in graph.outputs if v.name == output]
        producer = out.producer()
        if activation is None:
            assert producer is conv
        else:
            assert producer.op_type == activation
            assert producer.inputs[0].producer() is conv
    return conv


def assert_folds(
    proto,
    ort_equal,
    *,
    group,
    weight_shape,
    op="Conv",
    activation=None,
    shapes=None,
    tolerance=(None, None),
    rewrites=1,
    **options,
) -> tuple[ir.Model, FoldSplitConvConcat, ir.Node]:
    """Run the pass; check modified, structure, checker validity and onnxruntime numbers."""
    result, fold_pass = run_fold(proto, **options)
    assert result.modified is True, [s.reason for s in fold_pass.skips]
    assert len(fold_pass.rewrites) == rewrites
    assert fold_pass.rewrites[-1].details["group"] == group
    conv = assert_one_conv(
        result.model.graph, group=group, weight_shape=weight_shape, op=op, activation=activation
    )
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    ort_equal(proto, result.model, shapes=shapes, atol=tolerance[0], rtol=tolerance[1])
    return result.model, fold_pass, conv


def assert_refused(proto, reason, ort_equal, *, run_ort=True, shapes=None, **options) -> None:
    """The pass leaves the model byte-identical, says why, and outputs are unchanged."""
    untouched = serialized(ir.serde.deserialize_model(proto))
    result, fold_pass = run_fold(proto, **options)
    assert result.modified is False
    assert fold_pass.rewrites == []
    reasons = [skip.reason for skip in fold_pass.skips]
    assert len(reasons) == 1 and reason in reasons[0], reasons
    assert serialized(result.model) == untouched
    if run_ort:
        ort_equal(proto, result.model, shapes=shapes)


def dead_initializers(graph) -> list[str]:
    return [
        name
        for name, value in graph.initializers.items()
        if not value.uses() and not value.is_graph_output()
    ]


def concat_node(proto: onnx.ModelProto) -> onnx.NodeProto:
    return [n for n in proto.graph.node if n.op_type == "Concat"][-1]


def producer_of(proto: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if name in n.output)


def branch_value(proto: onnx.ModelProto, steps_back: int = 0, branch: int = 0) -> str:
    """A value inside a branch: the Concat input, or ``steps_back`` producers above it."""
    name = concat_node(proto).input[branch]
    for _ in range(steps_back):
        name = producer_of(proto, name).input[0]
    return name


def checked(proto: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(proto)
    return proto
