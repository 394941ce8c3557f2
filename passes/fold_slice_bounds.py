"""Replace Slice bounds and Split sizes that are computed from static dims by constants.

Before::

    X ─ Shape ─ Gather(1) ─ Add ─ Div ─ Mul ─┐
    X ───────────────────────────────────── Slice(X, starts=<computed>, ends=<computed>)

After::

    X ─ Slice(X, starts=[8], ends=[16])

``torch.onnx.export(dynamo=False)`` writes ``torch.chunk`` this way even when the channel dim is
static. Some compilers cannot build the result (TVM 0.27 leaves a Concat of such slices with
symbolic shapes un-lowered), so ``compile`` runs this pass before importing the model.

Folds when the bound (Slice ``starts``/``ends``/``axes``/``steps``, Split ``split``) is not a
constant already and its value follows from constants and static dims alone (see
``passes._shapes.ShapeFacts.int_values``). The arithmetic left without users is removed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ._common import (
    NameScope,
    Rewrite,
    Skip,
    add_constant,
    function_graphs,
    graph_scopes,
    is_onnx_op,
    node_label,
    remove_with_dead_producers,
)
from ._shapes import ShapeFacts

logger = logging.getLogger(__name__)

PASS_NAME = "fold-slice-bounds"

# op type -> indices of the inputs that are bounds (opset >= 10 Slice, opset >= 13 Split)
_BOUND_INPUTS = {"Slice": (1, 2, 3, 4), "Split": (1,)}


class FoldSliceBounds(ir.passes.InPlacePass):
    """Turn statically known Slice bounds and Split sizes into constants."""

    def __init__(self) -> None:
        super().__init__()
        self.rewrites: list[Rewrite] = []
        self.skips: list[Skip] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = []
        self.skips = []
        facts = ShapeFacts(model)
        names = NameScope(model)
        in_functions = function_graphs(model)
        for scope, graph, _ in graph_scopes(model):
            constants: dict[int, ir.Value] = {}
            replaced: list[ir.Value] = []
            for node in list(graph):
                if not is_onnx_op(node, *_BOUND_INPUTS):
                    continue
                count = 0
                for index in _BOUND_INPUTS[node.op_type]:
                    value = node.inputs[index] if index < len(node.inputs) else None
                    if value is None or ir.convenience.get_const_tensor(value) is not None:
                        continue
                    array = facts.int_values(value)
                    if array is None:
                        continue
                    constant = constants.get(id(value))
                    if constant is None:
                        constant = add_constant(
                            graph, np.asarray(array, np.int64), names.fresh(f"{value.name}_const"),
                            as_node=id(graph) in in_functions, before=node,
                        )  # fmt: skip
                        constants[id(value)] = constant
                    node.replace_input_with(index, constant)
                    replaced.append(value)
                    count += 1
                if count:
                    self.rewrites.append(
                        Rewrite(
                            PASS_NAME,
                            scope,
                            node_label(node),
                            f"{count} computed bound(s) of {node.op_type} made constant",
                        )  # fmt: skip
                    )
            dead = {
                id(v.producer()): v.producer()
                for v in replaced
                if v.producer() is not None and v.producer().graph is graph
                and not v.uses() and not v.is_graph_output()
                and all(not out.uses() and not out.is_graph_output() for out in v.producer().outputs)
            }  # fmt: skip
            if dead:
                remove_with_dead_producers(graph, dead.values())
        return ir.passes.PassResult(model, modified=bool(self.rewrites))
