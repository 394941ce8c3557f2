"""Channel arithmetic of Conv and ConvTranspose, defined once for every pass and for explain.

``ConvGeometry`` answers: how many channels each group sees, which slice of the input, output
and weight belongs to group *i*, the weight's shape, and what kind of convolution it is.

Weight layouts (ONNX):

    Conv           W[C_out, C_in / group, k...]   output channels on axis 0
    ConvTranspose  W[C_in, C_out / group, k...]   input channels on axis 0

A convolution is *depthwise* when ``group == C_in`` and ``group > 1`` (each input channel is
filtered on its own); ``C_out / C_in`` is then its channel multiplier. ``group == 1`` is dense;
anything else with ``group > 1`` is grouped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

CONV = "Conv"
CONV_TRANSPOSE = "ConvTranspose"


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Channels, groups and kernel of one Conv or ConvTranspose."""

    op_type: str
    in_channels: int
    out_channels: int
    group: int
    kernel: tuple[int, ...] = ()

    @classmethod
    def from_weight(cls, op_type: str, weight_shape: Sequence[int], group: int) -> ConvGeometry:
        """The geometry implied by a weight of ``weight_shape`` and ``group``.

        Conv: ``C_out = W[0]``, ``C_in = W[1] * group``; ConvTranspose: ``C_in = W[0]``,
        ``C_out = W[1] * group``.
        """
        first, second, *kernel = (int(d) for d in weight_shape)
        if op_type == CONV_TRANSPOSE:
            return cls(op_type, first, second * group, group, tuple(kernel))
        return cls(op_type, second * group, first, group, tuple(kernel))

    @property
    def transpose(self) -> bool:
        return self.op_type == CONV_TRANSPOSE

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.group

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.group

    @property
    def is_grouped(self) -> bool:
        """``group > 1``: depthwise convolutions included."""
        return self.group > 1

    @property
    def is_depthwise(self) -> bool:
        return self.group > 1 and self.group == self.in_channels

    @property
    def multiplier(self) -> int:
        """Output channels per input channel of a depthwise convolution, else 0."""
        return self.out_channels // self.in_channels if self.is_depthwise else 0

    @property
    def kind(self) -> str:
        """'dense', 'depthwise', 'depthwise, multiplier k', 'grouped' or 'invalid'."""
        if self.invalid_reason() is not None:
            return "invalid"
        if self.group == 1:
            return "dense"
        if self.is_depthwise:
            return (
                "depthwise" if self.multiplier == 1 else f"depthwise, multiplier {self.multiplier}"
            )
        return "grouped"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.transpose:
            return (self.in_channels, self.out_per_group, *self.kernel)
        return (self.out_channels, self.in_per_group, *self.kernel)

    @property
    def weight_group_axis_size(self) -> int:
        """Rows of the weight's axis 0 that belong to one group."""
        return self.in_per_group if self.transpose else self.out_per_group

    def input_range(self, index: int) -> range:
        """Input channels group ``index`` reads."""
        return range(index * self.in_per_group, (index + 1) * self.in_per_group)

    def output_range(self, index: int) -> range:
        """Output channels group ``index`` writes."""
        return range(index * self.out_per_group, (index + 1) * self.out_per_group)

    def weight_rows(self, index: int) -> slice:
        """Slice of the weight's axis 0 that holds group ``index``."""
        rows = self.weight_group_axis_size
        return slice(index * rows, (index + 1) * rows)

    def invalid_reason(self) -> str | None:
        """Why these numbers cannot describe a convolution, or None."""
        if self.group < 1:
            return f"group must be at least 1, got {self.group}"
        if self.in_channels % self.group:
            return f"C_in={self.in_channels} is not divisible by group={self.group}"
        if self.out_channels % self.group:
            return f"C_out={self.out_channels} is not divisible by group={self.group}"
        return None


def block_diagonal_weight(weight: np.ndarray, group: int, op_type: str = CONV) -> np.ndarray:
    """The ungrouped weight equal to a grouped one: each group's block, zeros elsewhere.

    Args:
        weight: ``[C_out, C_in/G, k...]`` for Conv, ``[C_in, C_out/G, k...]`` for ConvTranspose.
        group: G.
        op_type: ``"Conv"`` or ``"ConvTranspose"``. Both layouts hold the axis that is split
            into groups first, so the result is the same for both.

    Returns:
        ``[C_out, C_in, k...]`` for Conv, ``[C_in, C_out, k...]`` for ConvTranspose.
    """
    geometry = ConvGeometry.from_weight(op_type, weight.shape, group)
    ungrouped = dataclasses.replace(geometry, group=1)
    dense = np.zeros(ungrouped.weight_shape, weight.dtype)
    columns = geometry.output_range if geometry.transpose else geometry.input_range
    for index in range(group):
        rows = geometry.weight_rows(index)
        cols = columns(index)
        dense[rows, cols.start : cols.stop] = weight[rows]
    return dense
