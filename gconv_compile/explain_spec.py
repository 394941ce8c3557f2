"""One convolution setting (:class:`ConvSpec`), its groups (:class:`GroupRange`) and its rules.

These are the data types every ``explain`` module shares: the text, the model table and the
SVG drawing all read a :class:`ConvSpec`. Channel arithmetic (channels per group, ranges,
weight layout, kind) comes from :class:`gconv_compile.passes._geometry.ConvGeometry`, the one
definition the passes use too. :meth:`ConvSpec.validate` refuses a setting no framework accepts
with one paragraph that says why and what would work instead (:func:`invalid_groups_message`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gconv_compile.errors import UserError
from gconv_compile.explain_format import join_commas, join_x, paragraph
from gconv_compile.passes._geometry import CONV, CONV_TRANSPOSE, ConvGeometry


@dataclasses.dataclass(frozen=True)
class GroupRange:
    """The channels one group reads and writes (half-open ranges)."""

    index: int
    in_start: int
    in_stop: int
    out_start: int
    out_stop: int
    weight_start: int
    weight_stop: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolution setting; validated by :meth:`validate` before use.

    Attributes:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        groups: PyTorch ``groups`` / ONNX ``group``.
        kernel: Spatial kernel size, one entry per spatial dim.
        stride: Stride per spatial dim.
        dilation: Dilation per spatial dim.
        transpose: ConvTranspose rather than Conv.
    """

    in_channels: int
    out_channels: int
    groups: int = 1
    kernel: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    dilation: tuple[int, ...] = (1, 1)
    transpose: bool = False

    # -------------------------------------------------------------------------------- facts

    @property
    def geometry(self) -> ConvGeometry:
        return ConvGeometry(
            self.op_type, self.in_channels, self.out_channels, self.groups, self.kernel
        )

    @property
    def dims(self) -> int:
        return len(self.kernel)

    @property
    def in_per_group(self) -> int:
        return self.geometry.in_per_group

    @property
    def out_per_group(self) -> int:
        return self.geometry.out_per_group

    @property
    def kernel_size(self) -> int:
        return math.prod(self.kernel)

    @property
    def multiplier(self) -> int:
        """Output channels per input channel of a depthwise convolution, else 0."""
        return self.geometry.multiplier

    @property
    def kind(self) -> str:
        """dense, grouped, depthwise or 'depthwise, multiplier k'."""
        return self.geometry.kind

    @property
    def op_type(self) -> str:
        return CONV_TRANSPOSE if self.transpose else CONV

    @property
    def torch_layer(self) -> str:
        return f"{self.op_type}{self.dims}d"

    @property
    def weight_shape(self) -> list[int]:
        """ONNX and PyTorch weight shape (both use the same order)."""
        return list(self.geometry.weight_shape)

    @property
    def group_weight_shape(self) -> list[int]:
        """Shape of one group's slice of the weight (the weight of one split-conv-concat branch)."""
        branch = ConvGeometry(self.op_type, self.in_per_group, self.out_per_group, 1, self.kernel)
        return list(branch.weight_shape)

    @property
    def weight_params(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def dense_weight_params(self) -> int:
        dense = ConvGeometry(self.op_type, self.in_channels, self.out_channels, 1, self.kernel)
        return math.prod(dense.weight_shape)

    @property
    def macs_per_pixel(self) -> int:
        """Multiply-adds per output pixel (Conv) or per input pixel (ConvTranspose).

        Either way it is one multiply-add per weight: every weight is used once per pixel of
        the side it slides over.
        """
        return self.weight_params

    @property
    def dense_macs_per_pixel(self) -> int:
        return self.dense_weight_params

    def group_range(self, index: int) -> GroupRange:
        """The channel ranges of group ``index``."""
        geometry = self.geometry
        ins, outs = geometry.input_range(index), geometry.output_range(index)
        rows = geometry.weight_rows(index)
        return GroupRange(index, ins.start, ins.stop, outs.start, outs.stop, rows.start, rows.stop)

    def group_ranges(self) -> list[GroupRange]:
        """The channel ranges of every group, in order."""
        return [self.group_range(g) for g in range(self.groups)]

    # -------------------------------------------------------------------------------- checks

    def validate(self) -> ConvSpec:
        """Return self if every framework accepts the setting; else raise UserError."""
        for label, value in (("in", self.in_channels), ("out", self.out_channels)):
            if value <= 0:
                raise UserError(
                    paragraph(
                        f"{label}={value}: a convolution needs at least one "
                        f"{'input' if label == 'in' else 'output'} channel; "
                        f"{label} must be a positive whole number."
                    )
                )
        if self.groups <= 0:
            valid = join_commas(valid_groups(self.in_channels, self.out_channels))
            raise UserError(
                paragraph(
                    f"groups={self.groups}: groups must be at least 1 (groups=1 is the ordinary "
                    f"dense convolution). Valid groups for in={self.in_channels}, "
                    f"out={self.out_channels}: {valid}."
                )
            )
        for label, values in (("kernel", self.kernel), ("stride", self.stride),
                              ("dilation", self.dilation)):  # fmt: skip
            if any(v <= 0 for v in values):
                raise UserError(f"{label}={join_x(values)}: every {label} entry must be at least 1")
        if not (len(self.kernel) == len(self.stride) == len(self.dilation)):
            raise UserError(
                f"kernel={join_x(self.kernel)}, stride={join_x(self.stride)} and "
                f"dilation={join_x(self.dilation)} name different numbers of spatial dims"
            )
        message = invalid_groups_message(
            self.in_channels, self.out_channels, self.groups, transpose=self.transpose
        )
        if message:
            raise UserError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "op_type": self.op_type,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "groups": self.groups,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "dilation": list(self.dilation),
            "dims": self.dims,
            "transpose": self.transpose,
        }


def valid_groups(in_channels: int, out_channels: int) -> list[int]:
    """Every groups value that divides both channel counts."""
    common = math.gcd(in_channels, out_channels)
    return [g for g in range(1, common + 1) if common % g == 0]


def _nearest_multiples(value: int, groups: int) -> list[int]:
    below = (value // groups) * groups
    return [v for v in (below, below + groups) if v > 0 and v != value]


def _even_parts(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def invalid_groups_message(
    in_channels: int, out_channels: int, groups: int, *, transpose: bool = False
) -> str | None:
    """Why ``groups`` does not fit the channel counts and what would, or None if it fits.

    Assumes all three numbers are positive.
    """
    op_type = CONV_TRANSPOSE if transpose else CONV
    if ConvGeometry(op_type, in_channels, out_channels, groups).invalid_reason() is None:
        return None
    setting = f"in={in_channels}, out={out_channels}, groups={groups}"
    valid = join_commas(valid_groups(in_channels, out_channels))
    if groups > min(in_channels, out_channels):
        side, count = ("in", in_channels) if in_channels <= out_channels else ("out", out_channels)
        noun = "input" if side == "in" else "output"
        return paragraph(
            f"{setting} is not a valid convolution: groups={groups} is more than "
            f"{side}={count}, and every group needs at least one {noun} channel, so groups can "
            f"be at most {min(in_channels, out_channels)}. Valid groups for in={in_channels}, "
            f"out={out_channels}: {valid}."
        )
    # Which side(s) cannot be shared out evenly: the advice differs for each.
    bad = [
        (label, value)
        for label, value in (("in", in_channels), ("out", out_channels))
        if value % groups
    ]
    sentences = [_not_divisible_sentence(setting, in_channels, out_channels, groups, bad)]
    for label, value in bad:
        near = " or ".join(str(v) for v in _nearest_multiples(value, groups))
        sentences.append(f"Nearest valid {label}_channels for groups={groups}: {near}.")
    sentences.append(f"Valid groups for in={in_channels}, out={out_channels}: {valid}.")
    ways = _exact_output_ways(
        op_type, in_channels, out_channels, groups, {label for label, _ in bad}
    )
    sentences.append(f"To get exactly {out_channels} outputs anyway: " + "; or ".join(ways) + ".")
    return paragraph(" ".join(sentences))


def _not_divisible_sentence(
    setting: str, in_channels: int, out_channels: int, groups: int, bad: list[tuple[str, int]]
) -> str:
    reasons = " and ".join(
        f"{label}_channels={value} is not divisible by groups={groups} ({value} / {groups} = "
        f"{value / groups:.3g})"
        for label, value in bad
    )
    good = [label for label in ("in", "out") if label not in dict(bad)]
    if good:
        value = in_channels if good[0] == "in" else out_channels
        reasons += f", while {good[0]}_channels={value} is ({value // groups} per group)"
    shares = {"in": "read an equal share of the input channels",
              "out": "write an equal share of the output channels"}  # fmt: skip
    return (
        f"{setting} is not a valid convolution: {reasons}. Every group must "
        + " and ".join(shares[label] for label, _ in bad)
        + "."
    )


def _exact_output_ways(
    op_type: str, in_channels: int, out_channels: int, groups: int, bad: set[str]
) -> list[str]:
    """Ways to get exactly ``out_channels`` outputs when ``groups`` does not divide them."""
    in_parts = _even_parts(in_channels, groups)
    out_parts = _even_parts(out_channels, groups)
    ways = [
        f"split the input into {in_parts} channels, give the {groups} {op_type}s {out_parts} "
        "outputs and Concat them (an uneven split-conv-concat; it cannot be one grouped Conv)"
    ]
    if bad == {"out"}:
        up = _nearest_multiples(out_channels, groups)[-1]
        ways.append(
            f"use out={up} and drop the {up - out_channels} extra output channel"
            f"{'s' if up - out_channels > 1 else ''} (Slice [0:{out_channels}) on axis 1)"
        )
    elif bad == {"in"}:
        up = _nearest_multiples(in_channels, groups)[-1]
        ways.append(f"zero-pad the input to in={up} channels (Pad on axis 1)")
    return ways
