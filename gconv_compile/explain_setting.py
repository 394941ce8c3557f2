"""The explanation of one convolution setting: :func:`conv_lines` for people, :func:`conv_dict`
for machines.

Both say the same things about a :class:`~gconv_compile.explain_spec.ConvSpec`: its weight shape
in each framework's order, the channel range of every group, parameters and multiply-adds
against the dense convolution, the equivalent split-conv-concat and the setting's name in each
framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gconv_compile.explain_format import MAX_LISTED_GROUPS, collapse, join_x
from gconv_compile.explain_spec import ConvSpec

_PAD = " " * 12


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
    names.update(_keras_xla_names(spec, keras_extra))
    return names


def _keras_xla_names(spec: ConvSpec, keras_extra: str) -> dict[str, list[str]]:
    """The Keras layer and the XLA call for this setting."""
    g, dims = spec.groups, spec.dims
    kernel = _tuple(spec.kernel)
    if spec.transpose:
        return {
            "Keras": [
                f"Conv{dims}DTranspose(filters={spec.out_channels}, kernel_size={kernel}"
                f"{keras_extra})"
                if g == 1
                else f"Conv{dims}DTranspose has no groups setting: use the split-conv-concat form"
            ],
            "XLA": [
                f"conv_general_dilated(..., lhs_dilation={_tuple(spec.stride)}, "
                f"feature_group_count={g})",
                "(= a conv over the stride-dilated input, with the kernel flipped and its in/out",
                "axes swapped within each group)",
            ],
        }
    if spec.multiplier and dims <= 2:
        keras = [
            f"DepthwiseConv{dims}D(kernel_size={kernel}, depth_multiplier={spec.multiplier}"
            f"{keras_extra})",
            f"or Conv{dims}D(filters={spec.out_channels}, kernel_size={kernel}{keras_extra}, "
            f"groups={g})",
        ]
    elif dims <= 3:
        keras = [
            f"Conv{dims}D(filters={spec.out_channels}, kernel_size={kernel}{keras_extra}, "
            f"groups={g})"
        ]
    else:
        keras = [f"no layer for {dims} spatial dims"]
    xla = [f"conv_general_dilated(..., feature_group_count={g})  (lax, HLO Convolution)"]
    return {"Keras": keras, "XLA": xla}


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


def _summary_line(spec: ConvSpec) -> str:
    shape = f"kernel {join_x(spec.kernel)}"
    if any(s != 1 for s in spec.stride):
        shape += f", stride {join_x(spec.stride)}"
    if any(d != 1 for d in spec.dilation):
        shape += f", dilation {join_x(spec.dilation)}"
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
    lines = [*_summary_line(spec).split("\n"), ""]
    lines.extend(_weight_lines(spec))
    lines.append("")
    lines.extend(_group_lines(spec))
    lines.append("")
    lines.extend(_cost_lines(spec))
    lines.append("")
    lines.extend(_split_form_lines(spec))
    lines.append("")
    for index, (framework, spellings) in enumerate(framework_names(spec).items()):
        label = "named" if index == 0 else ""
        lines.append(f"{label:12}{framework:8} {spellings[0]}")
        lines.extend(f"{_PAD}{'':8} {more}" for more in spellings[1:])
    return lines


def _weight_lines(spec: ConvSpec) -> list[str]:
    g = spec.groups
    axes = "in, out/groups" if spec.transpose else "out, in/groups"
    spatial = {1: "kL", 2: "kH, kW", 3: "kD, kH, kW"}.get(
        spec.dims, ", ".join(f"k{i}" for i in range(spec.dims))
    )
    lines = [
        f"{'weight':12}ONNX {spec.op_type} W, PyTorch .weight: {spec.weight_shape}"
        f"  = [{axes}, {spatial}]"
    ]
    keras = keras_kernel_shape(spec)
    if keras is not None:
        layer, shape, order = keras
        lines.append(f"{_PAD}Keras {layer} kernel (channels-last): {shape}  = [{spatial}, {order}]")
    if g > 1:
        axis_name = "input" if spec.transpose else "output"
        lines.append(
            f"{_PAD}one tensor, not {g}: {g} kernels {spec.group_weight_shape} stacked on axis 0 "
            f"({axis_name} channels)"
        )
    return lines


def _group_lines(spec: ConvSpec) -> list[str]:
    """One aligned row per group (long lists collapsed) and what each output channel reads."""
    shown = collapse(spec.group_ranges())
    cells = [
        (f"group {r.index}:", f"in [{r.in_start}:{r.in_stop})", f"out [{r.out_start}:{r.out_stop})",
         f"W[{r.weight_start}:{r.weight_stop}]")
        for r in shown
        if r is not None
    ]  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    rows = iter(cells)
    lines = []
    for index, group in enumerate(shown):
        label = "groups" if index == 0 else ""
        if group is None:
            lines.append(f"{label:12}  ... {spec.groups - 4} more groups, same pattern ...")
            continue
        a, b, c, d = (cell.ljust(w) for cell, w in zip(next(rows), widths))
        lines.append(f"{label:12}{a} {b} -> {c}  {d}".rstrip())
    lines.append(
        f"{_PAD}each output channel reads {spec.in_per_group} of the {spec.in_channels} input "
        f"channel{'s' if spec.in_channels > 1 else ''}"
    )
    return lines


def _cost_lines(spec: ConvSpec) -> list[str]:
    g = spec.groups
    bias = spec.out_channels
    lines = [
        f"{'cost':12}parameters {spec.weight_params + bias:,} = weights {spec.weight_params:,} "
        f"+ bias {bias:,}"
    ]
    if g > 1:
        dense = spec.dense_weight_params
        lines.append(
            f"{_PAD}dense (groups=1): {dense + bias:,} = weights {dense:,} + bias {bias:,}; "
            f"{g}x fewer weights"
        )
    pixel = "input pixel" if spec.transpose else "output pixel"
    lines.append(
        f"{_PAD}multiply-adds per {pixel}: {spec.macs_per_pixel:,}"
        + (f" (dense: {spec.dense_macs_per_pixel:,}; {g}x fewer)" if g > 1 else "")
    )
    return lines


def _split_form_lines(spec: ConvSpec) -> list[str]:
    g = spec.groups
    if g == 1:
        return [f"{'same as':12}one {spec.op_type}: a dense convolution has no split form"]
    attrs = ""
    if any(s != 1 for s in spec.stride):
        attrs += f", strides={list(spec.stride)}"
    if any(d != 1 for d in spec.dilation):
        attrs += f", dilations={list(spec.dilation)}"
    names = [f"x{i}" for i in range(g)]
    outs = [f"y{i}" for i in range(g)]
    collapsed = collapse(list(range(g)))

    def seq(items: list[str]) -> str:
        return ", ".join("..." if i is None else items[i] for i in collapsed)

    sizes = (
        f"[{spec.in_per_group}] * {g}" if g > MAX_LISTED_GROUPS else str([spec.in_per_group] * g)
    )
    lines = [
        f"{'same as':12}{seq(names)} = Split(X, axis=1, split={sizes})",
        f"{_PAD}# every branch: weight {spec.group_weight_shape}, group=1{attrs}",
    ]
    for i in collapsed:
        if i is None:
            lines.append(f"{_PAD}...")
            continue
        r = spec.group_range(i)
        lines.append(
            f"{_PAD}y{i} = {spec.op_type}(x{i}, W[{r.weight_start}:{r.weight_stop}], "
            f"B[{r.out_start}:{r.out_stop}])"
        )
    lines.append(f"{_PAD}Y = Concat({seq(outs)}, axis=1)")
    lines.append(
        f"{_PAD}(`gconv-compile optimize` folds this form back into the one grouped {spec.op_type})"
    )
    return lines


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
