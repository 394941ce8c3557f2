"""Helpers shared by the grouped-convolution passes: records, constants, Conv attributes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass
class Rewrite:
    """One block a pass rewrote."""

    pass_name: str
    scope: str
    anchor: str
    summary: str
    details: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Skip:
    """One block a pass looked at and left alone, with the reason."""

    pass_name: str
    scope: str
    anchor: str
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


NODE = "{node}"
"""Placeholder in a refusal's reason for the label of the node it is about."""


class Refusal(Exception):
    """Raised inside matching to abandon a block; ``str()`` is the user-facing reason.

    Like onnxscript's ``MatchFailureError``, a refusal carries the node it is about. The reason
    names it with the placeholder ``{node}`` (:data:`NODE`), which is replaced by the node's
    label here, once, rather than at every raise site::

        raise Refusal(f"weight of {NODE} is not a constant", conv)

    Args:
        reason: What is wrong, for the user; ``{node}`` stands for ``node``'s label.
        node: The node the refusal is about, if any.
    """

    def __init__(self, reason: str, node: ir.Node | None = None) -> None:
        self.node = node
        self.reason = reason
        super().__init__(reason if node is None else reason.replace(NODE, node_label(node)))


CONV_OPS = ("Conv", "ConvTranspose")


def is_onnx_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def node_label(node: ir.Node) -> str:
    return node.name or f"<unnamed {node.op_type}>"


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents, else None.

    Constants are initializers (not also graph inputs) and Constant nodes, seen through any
    chain of Identity nodes: TorchScript writes the second use of a shared weight as
    ``Identity(initializer)``.
    """
    value = through_identity(value)
    if value is None or value.is_graph_input():
        # An initializer that is also a graph input can be overridden at run time.
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def through_identity(value: ir.Value | None) -> ir.Value | None:
    """The value an Identity chain ending in ``value`` copies (``value`` itself if none)."""
    seen: set[int] = set()
    while value is not None and id(value) not in seen:
        seen.add(id(value))
        producer = value.producer()
        if not is_onnx_op(producer, "Identity") or not producer.inputs:
            break
        value = producer.inputs[0]
    return value


def int_list(node: ir.Node, name: str, default: Iterable[int] | None = None) -> list[int] | None:
    attr = node.attributes.get(name)
    if attr is None:
        return None if default is None else list(default)
    return [int(v) for v in attr.as_ints()]


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def attr_str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_string()


@dataclasses.dataclass(frozen=True)
class ConvAttrs:
    """Conv/ConvTranspose attributes with every default made explicit."""

    op_type: str
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end...
    auto_pad: str
    group: int
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()

    @property
    def spatial_rank(self) -> int:
        return len(self.kernel)

    @property
    def effective_kernel(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilations))


def conv_attrs(node: ir.Node, weight_shape: tuple[int, ...]) -> ConvAttrs:
    """Normalise a Conv/ConvTranspose node's attributes against its weight shape."""
    rank = len(weight_shape) - 2
    kernel = tuple(int_list(node, "kernel_shape") or weight_shape[2:])
    if kernel != tuple(weight_shape[2:]):
        raise Refusal(
            f"{NODE}: kernel_shape {list(kernel)} does not match its weight {list(weight_shape)}",
            node,
        )
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    pads = tuple(int_list(node, "pads", [0] * (2 * rank)))
    if auto_pad == "VALID":
        auto_pad, pads = "NOTSET", (0,) * (2 * rank)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = ()
    return ConvAttrs(
        op_type=node.op_type,
        kernel=kernel,
        strides=tuple(int_list(node, "strides", [1] * rank)),
        dilations=tuple(int_list(node, "dilations", [1] * rank)),
        pads=pads,
        auto_pad=auto_pad,
        group=attr_int(node, "group", 1),
        output_padding=tuple(int_list(node, "output_padding", [0] * rank))
        if node.op_type == "ConvTranspose"
        else (),
        output_shape=tuple(int_list(node, "output_shape", []))
        if node.op_type == "ConvTranspose"
        else (),
    )


class NameScope:
    """Fresh, deterministic names that do not collide with any name in the model."""

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        for graph in _all_graphs(model):
            for value in graph.inputs:
                self._taken.add(value.name or "")
            self._taken.update(graph.initializers.keys())
            for node in graph:
                self._taken.add(node.name or "")
                self._taken.update(o.name or "" for o in node.outputs)

    def fresh(self, base: str) -> str:
        base = base or "gconv"
        name = base
        counter = 1
        while name in self._taken:
            name = f"{base}_{counter}"
            counter += 1
        self._taken.add(name)
        return name


def _all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    yield from model.graphs()
    for function in model.functions.values():
        yield function.graph
        yield from function.graph.subgraphs()


def function_graphs(model: ir.Model) -> set[int]:
    """ids of graphs that are function bodies, or inside one (they cannot hold initializers)."""
    ids: set[int] = set()
    for function in model.functions.values():
        ids.add(id(function.graph))
        ids.update(id(g) for g in function.graph.subgraphs())
    return ids


def graph_scopes(model: ir.Model) -> Iterator[tuple[str, ir.Graph, bool]]:
    """Every graph to rewrite: (scope label, graph, is inside a function)."""
    main = model.graph
    yield (main.name or "main"), main, False
    for graph in main.subgraphs():
        yield f"{main.name or 'main'}/{graph.name or 'subgraph'}", graph, False
    for function in model.functions.values():
        label = f"function {function.domain}::{function.name}"
        yield label, function.graph, True
        for graph in function.graph.subgraphs():
            yield f"{label}/{graph.name or 'subgraph'}", graph, True


def add_constant(
    graph: ir.Graph,
    array: np.ndarray,
    name: str,
    *,
    as_node: bool,
    before: ir.Node,
) -> ir.Value:
    """A constant value in ``graph``: an initializer, or a Constant node inside functions."""
    tensor = ir.tensor(array, name=name)
    if as_node:
        node = ir.node(
            "Constant", inputs=[], attributes={"value": tensor}, name=name, num_outputs=1
        )
        value = node.outputs[0]
        value.name = name
        value.shape = ir.Shape(array.shape)
        value.dtype = tensor.dtype
        graph.insert_before(before, node)
        return value
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def take_over_value(old: ir.Value, result: ir.Value, names: NameScope, suffix: str) -> None:
    """Make ``result`` replace ``old`` everywhere, under ``old``'s name, type, shape and metadata.

    Keeping the name keeps value_info entries and graph output names as they were; ``old``
    is renamed ``<name>__<suffix>`` so the two never collide.
    """
    final_name = old.name
    old.name = names.fresh(f"{final_name}__{suffix}")
    result.name = final_name
    result.type = old.type
    result.shape = old.shape
    result.doc_string = old.doc_string
    result.metadata_props.update(old.metadata_props)
    old.replace_all_uses_with(result, replace_graph_outputs=True)


def remove_with_dead_producers(graph: ir.Graph, nodes: Iterable[ir.Node]) -> int:
    """Remove ``nodes``, then whatever only fed them: producers and initializers left unused.

    Only values that fed the removed nodes are considered, so dead code elsewhere in the model
    stays as the user wrote it.
    """
    doomed: list[ir.Node] = []
    seen: set[int] = set()
    frontier = list(nodes)
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        doomed.append(node)
    removed_ids = {id(n) for n in doomed}

    def unused(value: ir.Value) -> bool:
        if value.is_graph_output():
            return False
        return all(id(user) in removed_ids for user, _ in value.uses())

    # Grow the set: producers (in this graph) all of whose outputs feed only doomed nodes.
    changed = True
    while changed:
        changed = False
        for node in list(doomed):
            for value in node.inputs:
                if value is None:
                    continue
                producer = value.producer()
                if producer is None or id(producer) in removed_ids or producer.graph is not graph:
                    continue
                if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for attr in producer.attributes.values()):  # fmt: skip
                    continue
                if all(unused(out) for out in producer.outputs):
                    doomed.append(producer)
                    removed_ids.add(id(producer))
                    changed = True
    # Initializers may live in an outer graph when the block sits in an If/Loop body.
    orphans = [
        value
        for node in doomed
        for value in node.inputs
        if value is not None and value.is_initializer() and value.graph is not None
    ]
    outer = {
        id(value.producer()): value.producer()
        for node in doomed
        for value in node.inputs
        if value is not None
        and value.producer() is not None
        and value.producer().graph not in (None, graph)
    }
    graph.remove(doomed, safe=True)
    # Producers in an outer graph (the block sat in an If/Loop body) that fed only the block.
    for producer in outer.values():
        owner = producer.graph
        if owner is None or any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for attr in producer.attributes.values()
        ):
            continue
        if all(not out.uses() and not out.is_graph_output() for out in producer.outputs):
            remove_with_dead_producers(owner, [producer])
    for value in orphans:
        owner = value.graph
        if owner is None or owner.initializers.get(value.name) is not value:
            continue
        if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
            owner.initializers.pop(value.name)
    return len(doomed)
