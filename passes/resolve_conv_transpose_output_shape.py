"""Replace a ConvTranspose's ``output_shape`` by the explicit ``pads`` and ``output_padding``.

Before::

    X[N, C, 7, 7] ─ ConvTranspose(W 3x3, strides=[2, 2], output_shape=[15, 14]) ─ Y[N, C', 15, 14]

After::

    X[N, C, 7, 7] ─ ConvTranspose(W 3x3, strides=[2, 2], pads=[0, 1, 0, 0],
                                  output_padding=[0, 0]) ─ Y[N, C', 15, 14]

Some importers (TVM 0.27's among them) ignore ``output_shape`` and silently return the
natural output size; explicit pads say the same thing in a form every importer reads. The ONNX
rule, per spatial axis::

    total = stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1 - output_shape

split as ``auto_pad`` says (SAME_UPPER: the smaller half at the beginning; otherwise the larger
half at the beginning). A negative total means the wanted output is larger than the natural
one: the difference becomes ``output_padding`` and the pads are zero. ``output_shape``,
``auto_pad``, ``pads`` and ``output_padding`` are replaced by ``pads`` and ``output_padding``;
every other attribute and the node itself (name, inputs, outputs, metadata) stay.

Resolves when:
    * the node is an ONNX ConvTranspose with an ``output_shape`` attribute;
    * the input's spatial size and the weight's kernel size are static (from the model, or
      from ``input_shapes`` bound by the caller for symbolic graph inputs).

Refuses, leaving the node as it is and recording why: an input whose spatial size is not
static, and an ``output_shape`` with fewer entries than spatial axes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from ._common import NODE, Refusal, attr_str, int_list, is_onnx_op, node_label
from ._driver import AnchoredPass, Match, Scope
from ._shapes import ShapeFacts

logger = logging.getLogger(__name__)

PASS_NAME = "resolve-conv-transpose-output-shape"


@dataclasses.dataclass
class _Resolved(Match):
    pads: list[int]
    output_padding: list[int]
    wanted: list[int]


class ResolveConvTransposeOutputShape(AnchoredPass):
    """Turn ConvTranspose ``output_shape`` into explicit ``pads``/``output_padding``.

    After a call, ``rewrites`` lists the resolved nodes and ``skips`` those that could not be
    resolved, with the reason.

    Args:
        input_shapes: Concrete shapes of graph inputs whose dims are symbolic (what a user
            binds when compiling), so that the spatial sizes become known.
        subgraphs: Also resolve inside If/Loop/Scan bodies.
        functions: Also resolve inside model-local functions.
    """

    pass_name = PASS_NAME

    def __init__(
        self,
        *,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        subgraphs: bool = True,
        functions: bool = True,
    ) -> None:
        super().__init__(subgraphs=subgraphs, functions=functions)
        self.input_shapes = {k: [int(d) for d in v] for k, v in (input_shapes or {}).items()}
        self._facts: ShapeFacts | None = None

    def _begin(self, model: ir.Model) -> None:
        self._facts = ShapeFacts(model, self.input_shapes)

    def _is_anchor(self, node: ir.Node) -> bool:
        return is_onnx_op(node, "ConvTranspose") and "output_shape" in node.attributes

    def _match(self, node: ir.Node) -> _Resolved:
        x_shape = self._static(node.inputs[0] if node.inputs else None)
        w_shape = self._static(node.inputs[1] if len(node.inputs) > 1 else None)
        if x_shape is None or w_shape is None or len(x_shape) < 3:
            raise Refusal(
                f"{NODE} sets output_shape and its input's spatial size is not static", node
            )
        rank = len(x_shape) - 2
        wanted = int_list(node, "output_shape")[-rank:]
        if len(wanted) != rank:
            raise Refusal(
                f"{NODE}: output_shape {wanted} has fewer entries than the {rank} spatial axes",
                node,
            )
        kernel = int_list(node, "kernel_shape", w_shape[2:])
        strides = int_list(node, "strides", [1] * rank)
        dilations = int_list(node, "dilations", [1] * rank)
        output_padding = int_list(node, "output_padding", [0] * rank)
        upper = attr_str(node, "auto_pad", "NOTSET") == "SAME_UPPER"
        begins, ends = [], []
        for i in range(rank):
            total = (
                strides[i] * (x_shape[2 + i] - 1) + output_padding[i]
                + (kernel[i] - 1) * dilations[i] + 1 - wanted[i]
            )  # fmt: skip
            if total < 0:
                output_padding[i] -= total
                total = 0
            small, large = total // 2, total - total // 2
            begins.append(small if upper else large)
            ends.append(large if upper else small)
        return _Resolved(node, begins + ends, output_padding, wanted)

    def _static(self, value: ir.Value | None) -> list[int] | None:
        """The value's shape if its spatial dims (2 and later) are static."""
        if value is None:
            return None
        shape = self._facts.shape(value)
        if shape is None or len(shape) < 3:
            return None
        dims = list(shape)
        if any(not isinstance(d, int) for d in dims[2:]):
            return None
        return dims

    def _rewrite(self, match: _Resolved, scope: Scope) -> list[dict]:
        node = match.anchor
        for name in ("output_shape", "auto_pad", "pads", "output_padding"):
            node.attributes.pop(name, None)
        node.attributes["pads"] = ir.AttrInt64s("pads", match.pads)
        node.attributes["output_padding"] = ir.AttrInt64s("output_padding", match.output_padding)
        summary = (
            f"output_shape {match.wanted} -> pads {match.pads}, "
            f"output_padding {match.output_padding}"
        )
        logger.info("%s: %s", node_label(node), summary)
        return [
            {
                "summary": summary,
                "details": {
                    "output_shape": match.wanted,
                    "pads": match.pads,
                    "output_padding": match.output_padding,
                },
            }
        ]
