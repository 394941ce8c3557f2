"""The activation a fold moves after the grouped Conv: which ops qualify, and moving them.

An activation qualifies when it acts on each element alone, so that
``f(concat(a, b)) == concat(f(a), f(b))``: the unary ops of :data:`ELEMENTWISE_ACTIVATIONS`
(extra inputs, such as Clip's bounds, constant), and SiLU / Swish as exporters write it,
``Mul(v, Sigmoid(v))`` (no SiLU op exists before opset 24).
"""

from __future__ import annotations

import onnx_ir as ir

from ._common import NODE, Refusal, const_array, is_onnx_op
from ._driver import Scope

# Unary elementwise ops that act on each element alone, so f(concat(a, b)) == concat(f(a), f(b)).
ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSwish", "HardSigmoid", "Elu",
        "Selu", "Celu", "Softplus", "Softsign", "Mish", "Gelu", "ThresholdedRelu", "Abs",
        "Neg", "Exp", "Erf", "Identity",
    }
)  # fmt: skip
SILU = "SiLU"


def silu_parts(node: ir.Node | None) -> tuple[ir.Value, ir.Node] | None:
    """(v, the Sigmoid) when ``node`` is ``Mul(v, Sigmoid(v))`` in either order, else None."""
    if not is_onnx_op(node, "Mul") or len(node.inputs) != 2 or None in node.inputs:
        return None
    for value, other in (node.inputs, node.inputs[::-1]):
        sigmoid = other.producer()
        if is_onnx_op(sigmoid, "Sigmoid") and sigmoid.inputs[0] is value:
            return value, sigmoid
    return None


def activation_input(node: ir.Node | None) -> ir.Value | None:
    """The value ``node`` reads when it is an activation a fold can move, else None."""
    silu = silu_parts(node)
    if silu is not None:
        return silu[0]
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ELEMENTWISE_ACTIVATIONS and node.inputs and node.inputs[0] is not None:
        return node.inputs[0]
    return None


def activation_name(node: ir.Node) -> str:
    return SILU if silu_parts(node) is not None else node.op_type


def check_same_activation(activations: list[ir.Node | None]) -> None:
    """Raise unless every branch has the same activation (op, attributes, constants) or none."""
    signatures = []
    for act in activations:
        if act is None or silu_parts(act) is not None:
            signatures.append(None if act is None else (SILU,))
            continue
        attrs = tuple(sorted((k, repr(a.value)) for k, a in act.attributes.items()))
        extras = []
        for value in act.inputs[1:]:
            if value is None:
                extras.append(None)
                continue
            array = const_array(value)
            if array is None:
                raise Refusal(f"{NODE}: activation parameter '{value.name}' is not constant", act)
            extras.append((array.dtype.str, array.tobytes()))
        signatures.append((act.op_type, act.domain, attrs, tuple(extras)))
    if len(set(signatures)) > 1:
        kinds = [s[0] if s else "none" for s in signatures]
        raise Refusal(f"branches end in different activations {kinds}")


def activation_after(
    activation: ir.Node, conv_out: ir.Value, like: ir.Value, scope: Scope, base: str
) -> list[ir.Node]:
    """A copy of the branches' ``activation`` applied to the grouped Conv's output (its nodes,
    the last one's output the result)."""
    conv_out.name = scope.names.fresh(f"{base}_out")
    conv_out.type = like.type
    conv_out.shape = like.shape
    if silu_parts(activation) is not None:
        sigmoid = ir.node("Sigmoid", [conv_out], name=scope.names.fresh(f"{base}_sigmoid"))
        sigmoid.outputs[0].name = scope.names.fresh(f"{base}_sigmoid_out")
        sigmoid.outputs[0].type, sigmoid.outputs[0].shape = like.type, like.shape
        mul = ir.node("Mul", [conv_out, sigmoid.outputs[0]], name=scope.names.fresh(f"{base}_silu"))
        return [sigmoid, mul]
    node = ir.node(
        activation.op_type,
        [conv_out, *activation.inputs[1:]],
        attributes=dict(activation.attributes),
        name=scope.names.fresh(f"{base}_{activation.op_type.lower()}"),
        domain=activation.domain,
        version=activation.version,
        num_outputs=1,
    )
    return [node]
