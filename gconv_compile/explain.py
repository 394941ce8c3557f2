"""Explain the ``groups`` setting of a convolution, from its numbers or from a model.

Two questions come back again and again: what a given ``groups`` value does to the weight shape
and the channel wiring, and where a model's grouped convolutions are. This module answers both:

* :func:`parse_conv_spec` turns ``in=16,out=16,groups=2,kernel=1`` into a validated
  :class:`ConvSpec`; a setting no framework accepts raises :class:`UserError` with one paragraph
  that says why and what would work instead.
* :func:`conv_lines` / :func:`conv_dict` describe one setting: weight shape in each framework's
  order, the channel range of every group, parameters and multiply-adds against the dense
  convolution, the equivalent split-conv-concat and the setting's name in each framework.
* :func:`explain_model` lists every Conv/ConvTranspose of a model with its cost at the model's
  static shapes, runs the fold pass on a copy to say which split-conv-concat blocks would fold,
  and flags depthwise + pointwise pairs (depthwise-separable convolutions).

Grouping in one picture (``in=4, out=4, groups=2``)::

    in 0 ─┬─ out 0        weight [4, 2, k, k]: rows 0-1 read input channels 0-1,
    in 1 ─┴─ out 1                           rows 2-3 read input channels 2-3
    in 2 ─┬─ out 2
    in 3 ─┴─ out 3
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gconv_compile.errors import UserError

logger = logging.getLogger(__name__)

# Width of the "gconv-compile: error: " prefix the CLI puts before a UserError message.
_ERROR_PREFIX = 22
_WRAP = 100
# Group lists longer than this show the first three groups and the last one.
_MAX_LISTED_GROUPS = 6

_KEY_ALIASES = {
    "in": "in",
    "in_channels": "in",
    "out": "out",
    "out_channels": "out",
    "groups": "groups",
    "group": "groups",
    "kernel": "kernel",
    "kernel_size": "kernel",
    "kernel_shape": "kernel",
    "stride": "stride",
    "strides": "stride",
    "dilation": "dilation",
    "dilations": "dilation",
    "dims": "dims",
}
_SPEC_EXAMPLE = "e.g. --conv in=16,out=16,groups=2,kernel=3x3"


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
    def dims(self) -> int:
        return len(self.kernel)

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def kernel_size(self) -> int:
        return math.prod(self.kernel)

    @property
    def multiplier(self) -> int:
        """Output channels per input channel of a depthwise convolution, else 0."""
        if self.groups > 1 and self.groups == self.in_channels:
            return self.out_per_group
        return 0

    @property
    def kind(self) -> str:
        """dense, grouped, depthwise or 'depthwise, multiplier k'."""
        return conv_kind(self.in_channels, self.out_channels, self.groups)

    @property
    def op_type(self) -> str:
        return "ConvTranspose" if self.transpose else "Conv"

    @property
    def torch_layer(self) -> str:
        return f"{'ConvTranspose' if self.transpose else 'Conv'}{self.dims}d"

    @property
    def weight_shape(self) -> list[int]:
        """ONNX and PyTorch weight shape (both use the same order)."""
        if self.transpose:
            return [self.in_channels, self.out_per_group, *self.kernel]
        return [self.out_channels, self.in_per_group, *self.kernel]

    @property
    def group_weight_shape(self) -> list[int]:
        """Shape of one group's slice of the weight (the weight of one split-conv-concat branch)."""
        if self.transpose:
            return [self.in_per_group, self.out_per_group, *self.kernel]
        return [self.out_per_group, self.in_per_group, *self.kernel]

    @property
    def weight_params(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def dense_weight_params(self) -> int:
        return self.in_channels * self.out_channels * self.kernel_size

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

    def group_ranges(self) -> list[GroupRange]:
        """The channel ranges of every group, in order."""
        ci, co = self.in_per_group, self.out_per_group
        weight_rows = ci if self.transpose else co
        return [
            GroupRange(
                g,
                g * ci,
                (g + 1) * ci,
                g * co,
                (g + 1) * co,
                g * weight_rows,
                (g + 1) * weight_rows,
            )  # fmt: skip
            for g in range(self.groups)
        ]

    # -------------------------------------------------------------------------------- checks

    def validate(self) -> ConvSpec:
        """Return self if every framework accepts the setting; else raise UserError."""
        for label, value in (("in", self.in_channels), ("out", self.out_channels)):
            if value <= 0:
                raise UserError(
                    _paragraph(
                        f"{label}={value}: a convolution needs at least one "
                        f"{'input' if label == 'in' else 'output'} channel; "
                        f"{label} must be a positive whole number."
                    )
                )
        if self.groups <= 0:
            raise UserError(
                _paragraph(
                    f"groups={self.groups}: groups must be at least 1 (groups=1 is the ordinary "
                    f"dense convolution). Valid groups for in={self.in_channels}, "
                    f"out={self.out_channels}: {_list(valid_groups(self.in_channels, self.out_channels))}."
                )
            )
        for label, values in (("kernel", self.kernel), ("stride", self.stride),
                              ("dilation", self.dilation)):  # fmt: skip
            if any(v <= 0 for v in values):
                raise UserError(f"{label}={_x(values)}: every {label} entry must be at least 1")
        if not (len(self.kernel) == len(self.stride) == len(self.dilation)):
            raise UserError(
                f"kernel={_x(self.kernel)}, stride={_x(self.stride)} and "
                f"dilation={_x(self.dilation)} name different numbers of spatial dims"
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


def conv_kind(in_channels: int, out_channels: int, groups: int) -> str:
    """dense (groups=1), depthwise (groups=in), 'depthwise, multiplier k', grouped or invalid."""
    if groups < 1 or in_channels % groups or out_channels % groups:
        return "invalid"
    if groups == 1:
        return "dense"
    if groups == in_channels:
        k = out_channels // groups
        return "depthwise" if k == 1 else f"depthwise, multiplier {k}"
    return "grouped"


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
    setting = f"in={in_channels}, out={out_channels}, groups={groups}"
    valid = _list(valid_groups(in_channels, out_channels))
    if groups > min(in_channels, out_channels):
        side, count = ("in", in_channels) if in_channels <= out_channels else ("out", out_channels)
        noun = "input" if side == "in" else "output"
        return _paragraph(
            f"{setting} is not a valid convolution: groups={groups} is more than "
            f"{side}={count}, and every group needs at least one {noun} channel, so groups can "
            f"be at most {min(in_channels, out_channels)}. Valid groups for in={in_channels}, "
            f"out={out_channels}: {valid}."
        )
    bad = [
        (label, value)
        for label, value in (("in", in_channels), ("out", out_channels))
        if value % groups
    ]
    if not bad:
        return None
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
    sentences = [
        f"{setting} is not a valid convolution: {reasons}. Every group must "
        + " and ".join(shares[label] for label, _ in bad)
        + "."
    ]
    for label, value in bad:
        near = " or ".join(str(v) for v in _nearest_multiples(value, groups))
        sentences.append(f"Nearest valid {label}_channels for groups={groups}: {near}.")
    sentences.append(f"Valid groups for in={in_channels}, out={out_channels}: {valid}.")
    op = "ConvTranspose" if transpose else "Conv"
    in_parts = _even_parts(in_channels, groups)
    out_parts = _even_parts(out_channels, groups)
    ways = [
        f"split the input into {in_parts} channels, give the {groups} {op}s {out_parts} outputs "
        "and Concat them (an uneven split-conv-concat; it cannot be one grouped Conv)"
    ]
    if dict(bad).keys() == {"out"}:
        up = _nearest_multiples(out_channels, groups)[-1]
        ways.append(
            f"use out={up} and drop the {up - out_channels} extra output channel"
            f"{'s' if up - out_channels > 1 else ''} (Slice [0:{out_channels}) on axis 1)"
        )
    elif dict(bad).keys() == {"in"}:
        up = _nearest_multiples(in_channels, groups)[-1]
        ways.append(f"zero-pad the input to in={up} channels (Pad on axis 1)")
    sentences.append(f"To get exactly {out_channels} outputs anyway: " + "; or ".join(ways) + ".")
    return _paragraph(" ".join(sentences))


def _paragraph(text: str) -> str:
    """Wrap a message to the terminal width the CLI prints it at."""
    lines = textwrap.wrap(text, width=_WRAP, initial_indent="#" * _ERROR_PREFIX)
    if not lines:
        return text
    lines[0] = lines[0][_ERROR_PREFIX:]
    return "\n".join(lines)


def _list(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def _x(values: Iterable[int]) -> str:
    return "x".join(str(v) for v in values)


# ------------------------------------------------------------------------------------ parsing


def parse_conv_spec(text: str, *, transpose: bool = False) -> ConvSpec:
    """Parse and validate ``in=16,out=16,groups=2,kernel=3x3,stride=2,dims=2``.

    ``in`` and ``out`` are required; ``groups`` defaults to 1, ``kernel`` to 1, ``stride`` and
    ``dilation`` to 1. ``dims`` (1, 2 or 3, default 2) sets the spatial rank when the kernel is
    given as one number; a kernel like ``3x3`` sets it on its own.

    Raises:
        UserError: A malformed spec, an unknown key, or a setting no framework accepts.
    """
    values: dict[str, str] = {}
    if not text or not text.strip():
        raise UserError(f"--conv is empty; {_SPEC_EXAMPLE}")
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise UserError(f"--conv '{text}': empty entry between commas; {_SPEC_EXAMPLE}")
        if "=" not in item:
            raise UserError(f"--conv '{text}': '{item}' is not KEY=VALUE; {_SPEC_EXAMPLE}")
        key, _, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        canonical = _KEY_ALIASES.get(key)
        if canonical is None:
            close = difflib.get_close_matches(key, list(_KEY_ALIASES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(
                f"--conv: unknown key '{key}'{hint}; keys are in, out, groups, kernel, stride, "
                "dilation, dims"
            )
        if canonical in values:
            raise UserError(f"--conv: '{canonical}' is given twice")
        if not value:
            raise UserError(f"--conv: '{key}=' has no value; {_SPEC_EXAMPLE}")
        values[canonical] = value
    missing = [k for k in ("in", "out") if k not in values]
    if missing:
        raise UserError(f"--conv needs {' and '.join(k + '=' for k in missing)}; {_SPEC_EXAMPLE}")
    in_channels = _whole(values["in"], "in")
    out_channels = _whole(values["out"], "out")
    groups = _whole(values.get("groups", "1"), "groups")
    dims_given = "dims" in values
    dims = _whole(values.get("dims", "2"), "dims")
    if dims not in (1, 2, 3):
        raise UserError(f"dims={dims}: give 1, 2 or 3 spatial dims (Conv1d, Conv2d, Conv3d)")
    sizes = {key: _sizes(values.get(key, "1"), key) for key in ("kernel", "stride", "dilation")}
    ranks = {len(v) for v in sizes.values() if len(v) > 1}
    if len(ranks) > 1:
        raise UserError(
            "--conv: "
            + ", ".join(f"{k}={values[k]}" for k in sizes if k in values)
            + " name different numbers of spatial dims"
        )
    if ranks:
        rank = ranks.pop()
        if dims_given and rank != dims:
            named = next(k for k in sizes if len(sizes[k]) == rank)
            raise UserError(
                f"--conv: {named}={values[named]} has {rank} spatial dims but dims={dims}"
            )
        if rank not in (1, 2, 3):
            raise UserError(f"--conv: {rank} spatial dims; give 1, 2 or 3 (Conv1d, Conv2d, Conv3d)")
        dims = rank
    full = {key: v * dims if len(v) == 1 else v for key, v in sizes.items()}
    return ConvSpec(
        in_channels, out_channels, groups, full["kernel"], full["stride"], full["dilation"],
        transpose,
    ).validate()  # fmt: skip


def _whole(text: str, key: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise UserError(f"--conv: {key}={text} is not a whole number") from None


def _sizes(text: str, key: str) -> tuple[int, ...]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        sizes = tuple(int(p, 10) for p in parts)
    except ValueError:
        raise UserError(
            f"--conv: {key}={text}: expected a size like 3 or 3x3 (whole numbers joined by x)"
        ) from None
    if any(v <= 0 for v in sizes):
        raise UserError(f"--conv: {key}={text}: every {key} entry must be at least 1")
    return sizes


# ----------------------------------------------------------------------------------- one conv


def framework_names(spec: ConvSpec) -> dict[str, list[str]]:
    """How each framework spells this setting: framework -> lines (the first says it all)."""
    g, dims = spec.groups, spec.dims
    torch_args = [
        str(spec.in_channels),
        str(spec.out_channels),
        f"kernel_size={_tuple(spec.kernel)}",
    ]
    keras_extra = ""
    onnx_attrs = f"group={g}, kernel_shape={list(spec.kernel)}"
    if any(s != 1 for s in spec.stride):
        torch_args.append(f"stride={_tuple(spec.stride)}")
        keras_extra += f", strides={_tuple(spec.stride)}"
        onnx_attrs += f", strides={list(spec.stride)}"
    if any(d != 1 for d in spec.dilation):
        torch_args.append(f"dilation={_tuple(spec.dilation)}")
        keras_extra += f", dilation_rate={_tuple(spec.dilation)}"
        onnx_attrs += f", dilations={list(spec.dilation)}"
    torch_args.append(f"groups={g}")
    names: dict[str, list[str]] = {
        "PyTorch": [
            f"nn.{spec.torch_layer}({', '.join(torch_args)})"
            if dims <= 3
            else f"no nn layer for {dims} spatial dims"
        ],
        "ONNX": [f"{spec.op_type}(X, W, {onnx_attrs})"]
        if len(onnx_attrs) < 60
        else [
            f"{spec.op_type}(X, W, group={g}, kernel_shape={list(spec.kernel)},",
            onnx_attrs.split(", ", 2)[2] + ")",
        ],
    }
    kernel = _tuple(spec.kernel)
    if spec.transpose:
        names["Keras"] = [
            f"Conv{dims}DTranspose(filters={spec.out_channels}, kernel_size={kernel}{keras_extra})"
            if g == 1
            else f"Conv{dims}DTranspose has no groups setting: use the split-conv-concat form"
        ]
        names["XLA"] = [
            f"conv_general_dilated(..., lhs_dilation={_tuple(spec.stride)}, "
            f"feature_group_count={g})",
            "(= a conv over the stride-dilated input, with the kernel flipped and its in/out",
            "axes swapped within each group)",
        ]
        return names
    if spec.multiplier and dims <= 2:
        names["Keras"] = [
            f"DepthwiseConv{dims}D(kernel_size={kernel}, depth_multiplier={spec.multiplier}"
            f"{keras_extra})",
            f"or Conv{dims}D(filters={spec.out_channels}, kernel_size={kernel}{keras_extra}, "
            f"groups={g})",
        ]
    elif dims <= 3:
        names["Keras"] = [
            f"Conv{dims}D(filters={spec.out_channels}, kernel_size={kernel}{keras_extra}, "
            f"groups={g})"
        ]
    else:
        names["Keras"] = [f"no layer for {dims} spatial dims"]
    names["XLA"] = [f"conv_general_dilated(..., feature_group_count={g})  (lax, HLO Convolution)"]
    return names


def _tuple(values: Sequence[int]) -> str:
    if len(set(values)) == 1:
        return str(values[0])
    return "(" + ", ".join(str(v) for v in values) + ")"


def keras_kernel_shape(spec: ConvSpec) -> tuple[str, list[int], str] | None:
    """(layer, kernel shape, axis names) of the Keras layer, channels-last; None if none."""
    k = list(spec.kernel)
    if spec.transpose:
        if spec.groups != 1:
            return None
        return f"Conv{spec.dims}DTranspose", [*k, spec.out_channels, spec.in_channels], "out, in"
    if spec.multiplier and spec.dims <= 2:
        return (
            f"DepthwiseConv{spec.dims}D", [*k, spec.in_channels, spec.multiplier],
            "in, multiplier",
        )  # fmt: skip
    if spec.dims > 3:
        return None
    return f"Conv{spec.dims}D", [*k, spec.in_per_group, spec.out_channels], "in/groups, out"


def _collapse(items: Sequence[Any]) -> list[Any | None]:
    """Long lists show their first three items, a None placeholder and the last."""
    if len(items) <= _MAX_LISTED_GROUPS:
        return list(items)
    return [*items[:3], None, items[-1]]


def _summary_line(spec: ConvSpec) -> str:
    shape = f"kernel {_x(spec.kernel)}"
    if any(s != 1 for s in spec.stride):
        shape += f", stride {_x(spec.stride)}"
    if any(d != 1 for d in spec.dilation):
        shape += f", dilation {_x(spec.dilation)}"
    head = (
        f"{spec.torch_layer} in={spec.in_channels}, out={spec.out_channels}, "
        f"groups={spec.groups}, {shape}"
    )
    kind = spec.kind
    if kind == "dense":
        what = "dense: every output channel reads every input channel"
    elif kind == "grouped":
        what = (
            f"grouped: {spec.groups} independent "
            f"{'transposed convolutions' if spec.transpose else 'convolutions'} of "
            f"{spec.in_per_group} in -> "
            f"{spec.out_per_group} out"
        )
    elif spec.multiplier == 1:
        what = "depthwise: each input channel is filtered on its own into one output channel"
    else:
        what = (
            f"depthwise, multiplier {spec.multiplier}: each input channel is filtered on its "
            f"own into {spec.multiplier} output channels"
        )
    return f"{head}\n  {what}"  # two lines: the setting, then what it means


def conv_lines(spec: ConvSpec) -> list[str]:
    """The human explanation of one setting, one screen long."""
    pad = " " * 12
    g = spec.groups
    lines = [*_summary_line(spec).split("\n"), ""]
    axes = "in, out/groups" if spec.transpose else "out, in/groups"
    spatial = {1: "kL", 2: "kH, kW", 3: "kD, kH, kW"}.get(
        spec.dims, ", ".join(f"k{i}" for i in range(spec.dims))
    )
    lines.append(
        f"{'weight':12}ONNX {spec.op_type} W, PyTorch .weight: {spec.weight_shape}"
        f"  = [{axes}, {spatial}]"
    )
    keras = keras_kernel_shape(spec)
    if keras is not None:
        layer, shape, order = keras
        lines.append(f"{pad}Keras {layer} kernel (channels-last): {shape}  = [{spatial}, {order}]")
    if g > 1:
        axis_name = "input" if spec.transpose else "output"
        lines.append(
            f"{pad}one tensor, not {g}: {g} kernels {spec.group_weight_shape} stacked on axis 0 "
            f"({axis_name} channels)"
        )
    lines.append("")
    shown = _collapse(spec.group_ranges())
    cells = [
        (f"group {r.index}:", f"in [{r.in_start}:{r.in_stop})", f"out [{r.out_start}:{r.out_stop})",
         f"W[{r.weight_start}:{r.weight_stop}]")
        for r in shown
        if r is not None
    ]  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    rows = iter(cells)
    for index, group in enumerate(shown):
        label = "groups" if index == 0 else ""
        if group is None:
            lines.append(f"{label:12}  ... {g - 4} more groups, same pattern ...")
            continue
        a, b, c, d = (cell.ljust(w) for cell, w in zip(next(rows), widths))
        lines.append(f"{label:12}{a} {b} -> {c}  {d}".rstrip())
    lines.append(
        f"{pad}each output channel reads {spec.in_per_group} of the {spec.in_channels} input "
        f"channel{'s' if spec.in_channels > 1 else ''}"
    )
    lines.append("")
    bias = spec.out_channels
    lines.append(
        f"{'cost':12}parameters {spec.weight_params + bias:,} = weights {spec.weight_params:,} "
        f"+ bias {bias:,}"
    )
    if g > 1:
        dense = spec.dense_weight_params
        lines.append(
            f"{pad}dense (groups=1): {dense + bias:,} = weights {dense:,} + bias {bias:,}; "
            f"{g}x fewer weights"
        )
    pixel = "input pixel" if spec.transpose else "output pixel"
    lines.append(
        f"{pad}multiply-adds per {pixel}: {spec.macs_per_pixel:,}"
        + (f" (dense: {spec.dense_macs_per_pixel:,}; {g}x fewer)" if g > 1 else "")
    )
    lines.append("")
    lines.extend(_split_form_lines(spec))
    lines.append("")
    for index, (framework, spellings) in enumerate(framework_names(spec).items()):
        label = "named" if index == 0 else ""
        lines.append(f"{label:12}{framework:8} {spellings[0]}")
        lines.extend(f"{pad}{'':8} {more}" for more in spellings[1:])
    return lines


def _split_form_lines(spec: ConvSpec) -> list[str]:
    g = spec.groups
    pad = " " * 12
    if g == 1:
        return [f"{'same as':12}one {spec.op_type}: a dense convolution has no split form"]
    attrs = ""
    if any(s != 1 for s in spec.stride):
        attrs += f", strides={list(spec.stride)}"
    if any(d != 1 for d in spec.dilation):
        attrs += f", dilations={list(spec.dilation)}"
    names = [f"x{i}" for i in range(g)]
    outs = [f"y{i}" for i in range(g)]
    collapsed = _collapse(list(range(g)))

    def seq(items: list[str]) -> str:
        return ", ".join("..." if i is None else items[i] for i in collapsed)

    sizes = (
        f"[{spec.in_per_group}] * {g}" if g > _MAX_LISTED_GROUPS else str([spec.in_per_group] * g)
    )
    lines = [
        f"{'same as':12}{seq(names)} = Split(X, axis=1, split={sizes})",
        f"{pad}# every branch: weight {spec.group_weight_shape}, group=1{attrs}",
    ]
    for i in collapsed:
        if i is None:
            lines.append(f"{pad}...")
            continue
        r = _range_of(spec, i)
        lines.append(
            f"{pad}y{i} = {spec.op_type}(x{i}, W[{r.weight_start}:{r.weight_stop}], "
            f"B[{r.out_start}:{r.out_stop}])"
        )
    lines.append(f"{pad}Y = Concat({seq(outs)}, axis=1)")
    lines.append(
        f"{pad}(`gconv-compile optimize` folds this form back into the one grouped {spec.op_type})"
    )
    return lines


def _range_of(spec: ConvSpec, index: int) -> GroupRange:
    ci, co = spec.in_per_group, spec.out_per_group
    rows = ci if spec.transpose else co
    return GroupRange(index, index * ci, (index + 1) * ci, index * co, (index + 1) * co,
                      index * rows, (index + 1) * rows)  # fmt: skip


def conv_dict(spec: ConvSpec) -> dict[str, Any]:
    """The machine form of :func:`conv_lines`; group lists are complete, not collapsed."""
    keras = keras_kernel_shape(spec)
    return {
        "spec": spec.to_dict(),
        "kind": spec.kind,
        "depthwise_multiplier": spec.multiplier or None,
        "weight_shape": {
            "onnx": spec.weight_shape,
            "pytorch": spec.weight_shape,
            "keras": None if keras is None else {"layer": keras[0], "kernel": keras[1]},
            "per_group": spec.group_weight_shape,
            "layout": "[in, out/groups, *kernel]"
            if spec.transpose
            else "[out, in/groups, *kernel]",
        },
        "groups": [r.to_dict() for r in spec.group_ranges()],
        "params": {
            "weights": spec.weight_params,
            "bias": spec.out_channels,
            "dense_weights": spec.dense_weight_params,
        },
        "macs": {
            "per": "input pixel" if spec.transpose else "output pixel",
            "grouped": spec.macs_per_pixel,
            "dense": spec.dense_macs_per_pixel,
        },
        "names": {k: " ".join(v) for k, v in framework_names(spec).items()},
    }


# ------------------------------------------------------------------------------------- models


@dataclasses.dataclass
class ConvRow:
    """One Conv/ConvTranspose of a model, with its cost at the model's static shapes."""

    scope: str
    name: str
    op_type: str
    in_channels: int | None
    out_channels: int | None
    group: int
    kind: str
    weight_shape: list[int | str] | None
    params: int | None
    macs: Cost | None
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    input_name: str = ""
    output_name: str = ""

    @property
    def label(self) -> str:
        return f"{self.scope}/{self.name}" if self.scope else self.name

    def spec(self) -> ConvSpec:
        """This node as a :class:`ConvSpec`; UserError when its shapes are not known."""
        if self.in_channels is None or self.out_channels is None or not self.kernel:
            raise UserError(f"node '{self.name}': its weight shape is not known statically")
        return ConvSpec(
            self.in_channels, self.out_channels, self.group, self.kernel, self.strides,
            self.dilations, self.op_type == "ConvTranspose",
        ).validate()  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "name": self.name,
            "op_type": self.op_type,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "group": self.group,
            "kind": self.kind,
            "weight_shape": self.weight_shape,
            "params": self.params,
            # Exact when every dim is static; else coefficient x the named symbolic dims.
            "macs": None if self.macs is None else self.macs.exact,
            "macs_coefficient": None if self.macs is None else self.macs.coefficient,
            "macs_symbols": None if self.macs is None else list(self.macs.symbols),
            "macs_text": "?" if self.macs is None else self.macs.text,
        }


@dataclasses.dataclass
class ModelExplanation:
    """Every convolution of a model, its split-conv-concat blocks and depthwise-separable pairs."""

    path: str | None
    rows: list[ConvRow]
    blocks: list[dict[str, Any]]
    separable: list[dict[str, Any]]
    fold_error: str | None = None

    def find(self, name: str) -> ConvRow:
        for row in self.rows:
            if name in (row.name, row.label):
                return row
        names = [row.label for row in self.rows]
        listed = ", ".join("..." if n is None else n for n in _collapse(names))
        raise UserError(
            f"--node {name}: no Conv or ConvTranspose of that name"
            + (f" (the model has {len(names)}: {listed})" if names else " (the model has none)")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.path,
            "convs": [row.to_dict() for row in self.rows],
            "split_conv_concat": self.blocks,
            "fold_preview_error": self.fold_error,
            "depthwise_separable": self.separable,
        }

    def lines(self) -> list[str]:
        counts: dict[str, int] = {}
        for row in self.rows:
            kind = "unknown" if row.kind == "?" else row.kind.split(",")[0]
            counts[kind] = counts.get(kind, 0) + 1
        tally = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        lines = [
            f"{self.path or 'model'}: {len(self.rows)} Conv/ConvTranspose"
            + (f" ({tally})" if tally else "")
        ]
        if self.rows:
            lines.append("")
            lines.extend(_table(self.rows))
            total_params = sum(r.params or 0 for r in self.rows)
            unknown = sum(r.params is None for r in self.rows)
            lines.append(
                f"total: {total_params:,} parameters, {_total_cost(self.rows)} multiply-adds"
                + (f" ({_plural(unknown, 'Conv')} of unknown weight shape not counted)"
                   if unknown else "")
            )  # fmt: skip
            for row in self.rows:
                if row.kind == "invalid":
                    lines.append(
                        f"invalid: {row.label} has in={row.in_channels}, out={row.out_channels}, "
                        f"group={row.group}; see `gconv-compile explain {self.path or 'MODEL'} "
                        f"--node {row.label}`"
                    )
        lines.append("")
        if self.fold_error:
            lines.append(
                f"split-conv-concat blocks: unknown, the fold pass failed ({self.fold_error}); "
                "please report it"
            )
        elif self.blocks:
            lines.append(f"split-conv-concat blocks ({len(self.blocks)}):")
            for block in self.blocks:
                where = f"{block['scope']}/{block['anchor']}" if block["scope"] else block["anchor"]
                if block["would_fold"]:
                    lines.append(f"  {where}: would fold: {block['summary']}")
                else:
                    lines.append(f"  {where}: would NOT fold: {block['reason']}")
        else:
            lines.append("split-conv-concat blocks: none")
        if self.separable:
            lines.append("")
            lines.append(f"depthwise-separable pairs ({len(self.separable)}):")
            for pair in self.separable:
                kernel = _x(pair["kernel"])
                lines.append(
                    f"  {pair['depthwise']} ({pair['depthwise_kind']} {kernel}, "
                    f"{pair['in_channels']} -> {pair['middle_channels']}) then {pair['pointwise']} "
                    f"(1x1, {pair['middle_channels']} -> {pair['out_channels']})"
                )
                lines.append(
                    f"    vs one dense {kernel} Conv {pair['in_channels']} -> "
                    f"{pair['out_channels']}: parameters {pair['params']:,} vs "
                    f"{pair['dense_params']:,} ({pair['dense_params'] / pair['params']:.1f}x fewer)"
                )
                lines.append(
                    f"    multiply-adds {pair['macs_per_pixel']:,} vs "
                    f"{pair['dense_macs_per_pixel']:,} per output pixel "
                    f"({pair['dense_macs_per_pixel'] / pair['macs_per_pixel']:.1f}x fewer)"
                    + (
                        f", {pair['macs_symbolic']} vs {pair['dense_macs_symbolic']} in all"
                        if pair["macs_symbolic"]
                        else ""
                    )
                )
        return lines


def _table(rows: list[ConvRow]) -> list[str]:
    header = ["node", "op", "in", "out", "group", "kind", "weight", "params", "MACs"]
    body = [
        [
            row.label,
            row.op_type,
            _opt(row.in_channels),
            _opt(row.out_channels),
            str(row.group),
            row.kind,
            "?" if row.weight_shape is None else "[" + ", ".join(map(str, row.weight_shape)) + "]",
            "?" if row.params is None else f"{row.params:,}",
            "?" if row.macs is None else row.macs.text,
        ]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    right = {2, 3, 4, 7, 8}

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return [fmt(header), *[fmt(r) for r in body]]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _opt(value: int | None) -> str:
    return "?" if value is None else str(value)


def _human(n: int) -> str:
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _dim(d: Any) -> int | str | None:
    """An int, a symbolic name, or None for a dim nobody named."""
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    return value if isinstance(value, str) and value else None


@dataclasses.dataclass(frozen=True)
class Cost:
    """A count such as multiply-adds: a number times the symbolic dims it depends on."""

    coefficient: int
    symbols: tuple[str, ...] = ()

    @property
    def exact(self) -> int | None:
        return None if self.symbols else self.coefficient

    @property
    def text(self) -> str:
        return " x ".join([*self.symbols, _human(self.coefficient)])


def _cost(coefficient: int, dims: Sequence[Any]) -> Cost:
    """``coefficient`` times every dim; symbolic dims stay as names ('?' when unnamed)."""
    symbols: list[str] = []
    for d in dims:
        value = _dim(d)
        if isinstance(value, int):
            coefficient *= value
        else:
            symbols.append(value or "?")
    return Cost(coefficient, tuple(symbols))


def _total_cost(rows: Sequence[ConvRow]) -> str:
    """Sum of the rows' costs, grouping terms that share the same symbolic dims."""
    terms: dict[tuple[str, ...], int] = {}
    unknown = 0
    for row in rows:
        if row.macs is None:
            unknown += row.params is not None
            continue
        key = tuple(sorted(row.macs.symbols))
        terms[key] = terms.get(key, 0) + row.macs.coefficient
    text = " + ".join(Cost(c, k).text for k, c in terms.items()) or "0"
    return text + (f" (+ {_plural(unknown, 'Conv')} of unknown size)" if unknown else "")


def explain_model(loaded) -> ModelExplanation:
    """Describe every Conv/ConvTranspose of ``loaded.model`` (a LoadedModel); the model is unchanged."""
    import onnx_ir as ir

    from gconv_compile.passes import FoldSliceBounds
    from gconv_compile.passes._common import graph_scopes, is_onnx_op
    from gconv_compile.passes._shapes import ShapeFacts

    model: ir.Model = loaded.model
    # Shapes come from a copy whose computed Slice bounds are constants (torch.chunk's
    # TorchScript export), so that shape inference sees through them; names are the same.
    shaped = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    FoldSliceBounds()(shaped)
    facts = ShapeFacts(shaped)
    rows: list[ConvRow] = []
    nodes: dict[int, ConvRow] = {}
    for scope, graph, _in_function in graph_scopes(model):
        label = "" if graph is model.graph else scope
        for node in graph:
            if is_onnx_op(node, "Conv", "ConvTranspose"):
                row = _conv_row(label, node, facts)
                rows.append(row)
                nodes[id(node)] = row
    fold_error = None
    try:
        blocks = _fold_preview(loaded)
    except Exception as exc:  # a bug in the pass must not hide the table it does not affect
        logger.debug("fold preview failed", exc_info=True)  # the output says so; no traceback
        blocks = []
        fold_error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    separable = _separable_pairs(model, nodes)
    path = None if loaded.path is None else str(loaded.path)
    return ModelExplanation(path, rows, blocks, separable, fold_error)


def _conv_row(scope: str, node, facts) -> ConvRow:
    from gconv_compile.passes._common import attr_int, int_list, node_label

    group = attr_int(node, "group", 1)
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    wshape = facts.shape(weight) if weight is not None else None
    dims = [_dim(d) for d in wshape] if wshape is not None else None
    transpose = node.op_type == "ConvTranspose"
    static = dims is not None and len(dims) >= 3 and all(isinstance(d, int) for d in dims[:2])
    in_channels = out_channels = None
    if static:
        if transpose:
            in_channels, out_channels = dims[0], dims[1] * group
        else:
            in_channels, out_channels = dims[1] * group, dims[0]
    kernel_dims = dims[2:] if dims is not None else []
    kernel = (
        tuple(kernel_dims) if kernel_dims and all(isinstance(d, int) for d in kernel_dims) else ()
    )
    params = None
    if dims is not None and all(isinstance(d, int) for d in dims):
        params = math.prod(dims)
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if has_bias and out_channels is not None:
            params += out_channels
    kind = "?" if in_channels is None else conv_kind(in_channels, out_channels, group)
    macs = None
    if params is not None:
        # Every weight is one multiply-add per pixel of the side it slides over: the output
        # for Conv, the input for ConvTranspose (which scatters each input pixel).
        side = node.inputs[0] if transpose else node.outputs[0]
        shape = facts.shape(side) if side is not None else None
        if shape is not None and len(shape) == len(dims):
            macs = _cost(math.prod(dims), [shape[0], *list(shape)[2:]])
    rank = len(kernel)
    return ConvRow(
        scope=scope,
        name=node_label(node),
        op_type=node.op_type,
        in_channels=in_channels,
        out_channels=out_channels,
        group=group,
        kind=kind,
        weight_shape=None if dims is None else [d if d is not None else "?" for d in dims],
        params=params,
        macs=macs,
        kernel=kernel,
        strides=tuple(int_list(node, "strides", [1] * rank) or ()),
        dilations=tuple(int_list(node, "dilations", [1] * rank) or ()),
        input_name=node.inputs[0].name if node.inputs and node.inputs[0] is not None else "",
        output_name=node.outputs[0].name or "",
    )


def _fold_preview(loaded) -> list[dict[str, Any]]:
    """Run the fold pass on a copy of the model and report what it would do to each block."""
    import onnx_ir as ir
    from onnx_ir import external_data as ir_external_data

    from gconv_compile.passes import FoldSplitConvConcat

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(loaded.model))
    if loaded.path is not None:
        # External weights in the copy are read relative to the model's folder, as in the original.
        base = str(loaded.path.parent)
        ir_external_data.set_base_dir(copy.graph, base)
        for function in copy.functions.values():
            ir_external_data.set_base_dir(function.graph, base)
    fold = FoldSplitConvConcat()
    fold(copy)
    main_scope = copy.graph.name or "main"

    def scope_of(record) -> str:
        return "" if record.scope == main_scope else record.scope

    blocks: list[dict[str, Any]] = []
    for rewrite in fold.rewrites:
        blocks.append({
            "scope": scope_of(rewrite), "anchor": rewrite.anchor, "would_fold": True,
            "summary": rewrite.summary, "reason": None, "details": rewrite.details,
        })  # fmt: skip
    for skip in fold.skips:
        blocks.append({
            "scope": scope_of(skip), "anchor": skip.anchor, "would_fold": False,
            "summary": None, "reason": skip.reason, "details": {},
        })  # fmt: skip
    return blocks


def _separable_pairs(model, rows: dict[int, ConvRow]) -> list[dict[str, Any]]:
    """Depthwise Convs whose output (through BatchNorm/activations) feeds a 1x1 dense Conv."""
    from gconv_compile.passes._common import graph_scopes, is_onnx_op
    from gconv_compile.passes.fold_split_conv_concat import ELEMENTWISE_ACTIVATIONS

    pairs = []
    for _scope, graph, _in_function in graph_scopes(model):
        for node in graph:
            row = rows.get(id(node))
            if row is None or row.op_type != "Conv" or not row.kind.startswith("depthwise"):
                continue
            value = node.outputs[0]
            pointwise = None
            for _ in range(4):  # Conv -> [BatchNorm] -> [activation] -> ... -> 1x1 Conv
                uses = list(value.uses())
                if len(uses) != 1 or value.is_graph_output():
                    break
                user = uses[0].node
                if is_onnx_op(user, "Conv") and uses[0].idx == 0:
                    pointwise = user
                    break
                if user.domain not in ("", "ai.onnx") or not (
                    user.op_type == "BatchNormalization" or user.op_type in ELEMENTWISE_ACTIVATIONS
                ):
                    break
                value = user.outputs[0]
            pw = rows.get(id(pointwise)) if pointwise is not None else None
            if pw is None or pw.group != 1 or not pw.kernel or any(k != 1 for k in pw.kernel):
                continue
            if any(st != 1 for st in pw.strides) or pw.params is None or row.params is None:
                continue
            dw_weights = math.prod(row.weight_shape)
            pw_weights = math.prod(pw.weight_shape)
            # One dense Conv with the depthwise kernel, straight from in to the pointwise out;
            # it gets a bias exactly when the pointwise Conv has one.
            dense_weights = pw.out_channels * row.in_channels * math.prod(row.kernel)
            dense_params = dense_weights + (pw.params - pw_weights)
            macs = dense_macs = None
            if row.macs is not None and pw.macs is not None and pw.macs.symbols == row.macs.symbols:
                pixels = row.macs.coefficient // dw_weights
                macs = Cost(row.macs.coefficient + pw.macs.coefficient, row.macs.symbols)
                dense_macs = Cost(dense_weights * pixels, row.macs.symbols)
            pairs.append({
                "depthwise": row.label, "pointwise": pw.label,
                "depthwise_kind": row.kind, "kernel": list(row.kernel),
                "in_channels": row.in_channels, "middle_channels": row.out_channels,
                "out_channels": pw.out_channels,
                "params": row.params + pw.params, "dense_params": dense_params,
                "macs_per_pixel": dw_weights + pw_weights,
                "dense_macs_per_pixel": dense_weights,
                "macs": None if macs is None else macs.exact,
                "macs_symbolic": None if macs is None else macs.text,
                "dense_macs": None if dense_macs is None else dense_macs.exact,
                "dense_macs_symbolic": None if dense_macs is None else dense_macs.text,
            })  # fmt: skip
    return pairs


# ---------------------------------------------------------------------------------- the command


def run_explain(
    *,
    model: str | None = None,
    conv: str | None = None,
    transpose: bool = False,
    node: str | None = None,
    svg: str | None = None,
    as_json: bool = False,
) -> str:
    """What ``gconv-compile explain`` prints; writes the SVG picture when asked.

    Args:
        model: Path of an ONNX model to describe.
        conv: A convolution setting such as ``in=16,out=16,groups=2,kernel=3x3``.
        transpose: The setting is a ConvTranspose.
        node: With ``model``: explain this one Conv/ConvTranspose as if given by ``conv``.
        svg: Draw the wiring of the setting (or of ``node``) to this path, atomically.
        as_json: Return JSON instead of text.

    Raises:
        UserError: Bad options, an invalid setting, or a model that cannot be read.
    """
    import json

    if model is None and conv is None:
        raise UserError(f"explain needs MODEL.onnx or --conv SPEC; {_SPEC_EXAMPLE}")
    if model is not None and conv is not None:
        raise UserError("explain takes MODEL.onnx or --conv SPEC, not both")
    if transpose and conv is None:
        raise UserError(
            "--transpose goes with --conv; a model's ConvTranspose nodes are found as is"
        )
    if node is not None and model is None:
        raise UserError("--node NAME picks a Conv of a model; use it with MODEL.onnx")
    if svg is not None:
        _check_svg_path(svg, model)
    data: dict[str, Any]
    if conv is not None:
        spec = parse_conv_spec(conv, transpose=transpose)
        lines, data, title = conv_lines(spec), conv_dict(spec), None
    else:
        from gconv_compile.model_io import load_model

        loaded = load_model(model)
        explanation = explain_model(loaded)
        if node is None:
            if svg is not None:
                names = [row.label for row in explanation.rows if row.kind not in ("dense", "?")]
                hint = f" (grouped ones: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                raise UserError(
                    "--svg draws one convolution: add --node NAME" + (hint if names else "")
                )
            lines, data, spec, title = explanation.lines(), explanation.to_dict(), None, None
        else:
            row = explanation.find(node)
            spec = row.spec()
            title = f"{row.label} in {Path(model).name}: {spec.torch_layer}(in={spec.in_channels}, out={spec.out_channels}, groups={spec.groups})"
            lines = [f"node '{row.label}' ({row.op_type}) of {model}:", "", *conv_lines(spec)]
            data = {"model": model, "node": row.to_dict(), **conv_dict(spec)}
    if svg is not None and spec is not None:
        from gconv_compile.explain_svg import choose_mode, render_svg, write_svg

        write_svg(render_svg(spec, title=title), svg)
        data["svg"] = {"path": svg, "mode": choose_mode(spec)}
        lines += ["", f"wrote {svg} ({choose_mode(spec)} picture, {spec.groups} groups)"]
    if as_json:
        return json.dumps(data, indent=2)
    return "\n".join(lines)


def _check_svg_path(path: str, model: str | None) -> None:
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--svg {path}: is a folder; give a file name such as groups.svg")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--svg {path}: folder '{parent}' does not exist")
    if model is not None and Path(model).exists() and target.resolve() == Path(model).resolve():
        raise UserError(f"--svg {path}: would overwrite the model; choose another path")
