"""Draw the channel wiring of a grouped convolution as SVG.

Two pictures, chosen by channel count so that 2 to 512 channels stay readable:

* wiring (up to 64 channels a side): input channels in a column on the left, output channels on
  the right, and one coloured band per group joining the input channels it reads to the output
  channels it writes (with one line per weight when there are few);
* mask (more channels): the weight as a block-diagonal matrix, output channels down and input
  channels across, one coloured block per group and grey where the dense weight would be; when
  blocks are too small to see, a zoomed inset shows the first groups.

Every group is a ``<g class="group">`` carrying ``data-group``, ``data-in-start``,
``data-in-stop``, ``data-out-start`` and ``data-out-stop`` (half-open channel ranges) and its own
``fill`` colour, so tests and other tools can read the picture back.
"""

from __future__ import annotations

import dataclasses
from xml.sax.saxutils import escape, quoteattr

from gconv_compile.explain_spec import ConvSpec, GroupRange

# Up to this many channels on the larger side the wiring picture is drawn; above, the mask.
WIRING_MAX_CHANNELS = 64
# Individual weight lines are drawn when there are at most this many (in, out) pairs.
MAX_EDGE_LINES = 384
# Legend rows listed before collapsing to "first three, ..., last".
MAX_LEGEND_GROUPS = 6

_TABLEAU10 = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
_FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
_WIDTH = 760
_MIN_BLOCK = 2.5


def group_colour(index: int, groups: int) -> str:
    """A distinct colour per group; neighbours differ strongly (golden-angle hues past ten)."""
    if groups <= len(_TABLEAU10):
        return _TABLEAU10[index]
    hue = (index * 137.50776) % 360
    lightness = (42, 52, 62)[index % 3]
    return f"hsl({hue:.2f},65%,{lightness}%)"


def choose_mode(spec: ConvSpec) -> str:
    return "wiring" if max(spec.in_channels, spec.out_channels) <= WIRING_MAX_CHANNELS else "mask"


def render_svg(spec: ConvSpec, *, title: str | None = None, mode: str | None = None) -> str:
    """The SVG text for ``spec``.

    Args:
        spec: A validated convolution setting.
        title: First line of the picture; defaults to the setting itself.
        mode: "wiring" or "mask"; by default chosen by channel count.
    """
    mode = mode or choose_mode(spec)
    if mode not in ("wiring", "mask"):
        raise ValueError(f"unknown mode {mode!r}")
    heading = title or _default_title(spec)
    ranges = spec.group_ranges()
    body, height = (_wiring if mode == "wiring" else _mask)(spec, ranges, top=78)
    legend, height = _legend(spec, ranges, height + 14)
    attrs = (
        f"xmlns='http://www.w3.org/2000/svg' width='{_WIDTH}' height='{height}' "
        f"viewBox='0 0 {_WIDTH} {height}' data-mode='{mode}' data-groups='{spec.groups}' "
        f"data-in='{spec.in_channels}' data-out='{spec.out_channels}' "
        f"data-op-type='{spec.op_type}'"
    )
    subtitle = (
        f"{spec.kind}; weight {spec.weight_shape} "
        f"({'in, out/groups' if spec.transpose else 'out, in/groups'}, kernel): "
        f"each group reads only its own {spec.in_per_group} input channel"
        f"{'s' if spec.in_per_group > 1 else ''}"
    )
    parts = [
        f"<svg {attrs}>",
        f"<title>{escape(heading)}</title>",
        f"<rect x='0' y='0' width='{_WIDTH}' height='{height}' fill='white'/>",
        _text(20, 30, heading, size=17, weight="bold"),
        _text(20, 52, subtitle, size=12, fill="#444"),
        *body,
        *legend,
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ pieces


def _default_title(spec: ConvSpec) -> str:
    kernel = "x".join(map(str, spec.kernel))
    return (
        f"{spec.torch_layer}(in={spec.in_channels}, out={spec.out_channels}, "
        f"groups={spec.groups}, kernel {kernel})"
    )


def _text(x: float, y: float, text: str, *, size: int = 12, anchor: str = "start",
          weight: str = "normal", fill: str = "#222") -> str:  # fmt: skip
    return (
        f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' "
        f"font-weight='{weight}' fill='{fill}' {_FONT}>{escape(text)}</text>"
    )


def _group_open(r: GroupRange, colour: str, css: str = "group") -> str:
    return (
        f"<g class='{css}' data-group='{r.index}' data-in-start='{r.in_start}' "
        f"data-in-stop='{r.in_stop}' data-out-start='{r.out_start}' "
        f"data-out-stop='{r.out_stop}' fill={quoteattr(colour)} stroke={quoteattr(colour)}>"
    )


@dataclasses.dataclass(frozen=True)
class _Columns:
    """Where the wiring picture puts its two columns of channel boxes."""

    pitch: float
    box_h: float
    in_top: float
    out_top: float
    left_x: float = 270.0
    right_x: float = 490.0
    box_w: float = 40.0

    def in_y(self, channel: float) -> float:
        return self.in_top + channel * self.pitch

    def out_y(self, channel: float) -> float:
        return self.out_top + channel * self.pitch


def _wiring(spec: ConvSpec, ranges: list[GroupRange], top: float) -> tuple[list[str], float]:
    n_in, n_out = spec.in_channels, spec.out_channels
    pitch = min(32.0, max(8.0, 560.0 / max(n_in, n_out)))
    column_top = top + 26
    cols = _Columns(
        pitch=pitch,
        box_h=max(pitch - 2.0, pitch * 0.8),
        in_top=column_top + (max(n_in, n_out) - n_in) * pitch / 2,
        out_top=column_top + (max(n_in, n_out) - n_out) * pitch / 2,
    )
    bottom = column_top + max(n_in, n_out) * pitch
    parts = [
        _text(cols.left_x + cols.box_w / 2, top + 12, f"input channels (in={n_in})",
              anchor="middle", weight="bold"),
        _text(cols.right_x + cols.box_w / 2, top + 12, f"output channels (out={n_out})",
              anchor="middle", weight="bold"),
    ]  # fmt: skip
    edges = sum((r.in_stop - r.in_start) * (r.out_stop - r.out_start) for r in ranges)
    # Group labels at least 24 px apart, every 1, 2, 4, 8... groups.
    label_every = 1
    while label_every * pitch * spec.in_per_group < 24:
        label_every *= 2
    last = spec.groups - 1
    for r in ranges:
        colour = group_colour(r.index, spec.groups)
        parts.extend(_wiring_group(r, colour, cols, edges <= MAX_EDGE_LINES))
        if (r.index % label_every == 0 and last - r.index >= label_every) or r.index == last:
            middle = cols.in_top + (r.in_start + r.in_stop) * cols.pitch / 2
            parts.append(
                _text(cols.left_x - 34, middle + 4, f"group {r.index}", anchor="end",
                      fill=_ink(colour), weight="bold")
            )  # fmt: skip
    parts.extend(_channel_numbers(cols, n_in, n_out))
    return parts, bottom


def _wiring_group(r: GroupRange, colour: str, cols: _Columns, draw_edges: bool) -> list[str]:
    """One group: its band, its weight lines (when few) and its channel boxes."""
    parts = [_group_open(r, colour)]
    gap = cols.pitch - cols.box_h
    a_top, a_bot = cols.in_y(r.in_start), cols.in_y(r.in_stop) - gap
    b_top, b_bot = cols.out_y(r.out_start), cols.out_y(r.out_stop) - gap
    x0, x1 = cols.left_x + cols.box_w, cols.right_x
    parts.append(
        f"<polygon class='band' points='{x0:.1f},{a_top:.1f} {x1:.1f},{b_top:.1f} "
        f"{x1:.1f},{b_bot:.1f} {x0:.1f},{a_bot:.1f}' fill-opacity='0.22' stroke='none'/>"
    )
    if draw_edges:
        for i in range(r.in_start, r.in_stop):
            for o in range(r.out_start, r.out_stop):
                y0 = cols.in_y(i) + cols.box_h / 2
                y1 = cols.out_y(o) + cols.box_h / 2
                parts.append(
                    f"<line class='edge' x1='{x0:.1f}' y1='{y0:.1f}' x2='{x1:.1f}' "
                    f"y2='{y1:.1f}' stroke-width='1.2' stroke-opacity='0.8'/>"
                )
    for side, start, stop, x, y_of in (
        ("in", r.in_start, r.in_stop, cols.left_x, cols.in_y),
        ("out", r.out_start, r.out_stop, cols.right_x, cols.out_y),
    ):
        for c in range(start, stop):
            parts.append(
                f"<rect class='channel' data-side='{side}' data-channel='{c}' x='{x:.1f}' "
                f"y='{y_of(c):.1f}' width='{cols.box_w:.1f}' height='{cols.box_h:.1f}' "
                "stroke='none'/>"
            )
    parts.append("</g>")
    return parts


def _channel_numbers(cols: _Columns, n_in: int, n_out: int) -> list[str]:
    """Every channel's number when the boxes are tall enough, else the first and last."""
    left, right = cols.left_x - 6, cols.right_x + cols.box_w + 6
    if cols.pitch >= 14:
        return [
            *(_text(left, cols.in_y(c) + cols.box_h / 2 + 4, str(c), size=11, anchor="end",
                    fill="#555") for c in range(n_in)),
            *(_text(right, cols.out_y(c) + cols.box_h / 2 + 4, str(c), size=11, fill="#555")
              for c in range(n_out)),
        ]  # fmt: skip
    return [
        _text(x, y_of(c) + cols.box_h / 2 + 4, str(c), size=10, anchor=anchor, fill="#555")
        for c, y_of, x, anchor in ((0, cols.in_y, left, "end"), (n_in - 1, cols.in_y, left, "end"),
                                   (0, cols.out_y, right, "start"),
                                   (n_out - 1, cols.out_y, right, "start"))
    ]  # fmt: skip


def _ink(colour: str) -> str:
    """The group colour, darkened for text if it is one of the pale palette entries."""
    return {"#edc948": "#a8891a", "#bab0ac": "#7a716d", "#ff9da7": "#d0606c"}.get(colour, colour)


def _mask(spec: ConvSpec, ranges: list[GroupRange], top: float) -> tuple[list[str], float]:
    n_in, n_out = spec.in_channels, spec.out_channels
    side = 440.0
    cell = side / max(n_in, n_out)
    width, height = max(n_in * cell, 60.0), max(n_out * cell, 60.0)
    cw, ch = width / n_in, height / n_out
    x0, y0 = 80.0, top + 34
    parts = [
        _text(x0 + width / 2, top + 12, f"input channel (0 .. {n_in - 1}) ->", anchor="middle",
              weight="bold"),
        f"<text x='{x0 - 44:.1f}' y='{y0 + height / 2:.1f}' font-size='12' font-weight='bold' "
        f"text-anchor='middle' fill='#222' {_FONT} transform='rotate(-90 {x0 - 44:.1f} "
        f"{y0 + height / 2:.1f})'>output channel (0 .. {n_out - 1}) -&gt;</text>",
        f"<rect class='dense' x='{x0:.1f}' y='{y0:.1f}' width='{width:.1f}' height='{height:.1f}' "
        "fill='#e8e8e8' stroke='#888' stroke-width='1'/>",
        _text(x0 - 4, y0 + 10, "0", size=10, anchor="end", fill="#555"),
        _text(x0 - 4, y0 + height, str(n_out), size=10, anchor="end", fill="#555"),
        _text(x0, y0 - 4, "0", size=10, fill="#555"),
        _text(x0 + width, y0 - 4, str(n_in), size=10, anchor="end", fill="#555"),
    ]  # fmt: skip
    for r in ranges:
        colour = group_colour(r.index, spec.groups)
        parts.append(_group_open(r, colour))
        # Blocks under ~2 px vanish when rasterised: draw them at least that big, centred on
        # their true place (the data attributes keep the exact ranges).
        bw, bh = (r.in_stop - r.in_start) * cw, (r.out_stop - r.out_start) * ch
        dw, dh = max(bw, _MIN_BLOCK), max(bh, _MIN_BLOCK)
        bx = x0 + r.in_start * cw - (dw - bw) / 2
        by = y0 + r.out_start * ch - (dh - bh) / 2
        parts.append(
            f"<rect class='block' x='{bx:.2f}' y='{by:.2f}' width='{dw:.2f}' height='{dh:.2f}' "
            "stroke='none'/>"
        )
        parts.append("</g>")
    note_y = y0 + height + 20
    parts.append(
        _text(x0, note_y, "coloured: the weight each group stores; grey: zero, not stored",
              size=11, fill="#444")
    )  # fmt: skip
    bottom = note_y
    block = min(spec.in_per_group * cw, spec.out_per_group * ch)
    if block < 12 and spec.groups > 1:
        bottom = max(bottom, _zoom(parts, spec, ranges, x0 + width + 40, y0))
    return parts, bottom


def _zoom(parts: list[str], spec: ConvSpec, ranges: list[GroupRange], x0: float,
          y0: float) -> float:  # fmt: skip
    """Magnify the first few groups, whose blocks are too small to see in the full mask."""
    shown = ranges[: min(4, spec.groups)]
    n_in, n_out = shown[-1].in_stop, shown[-1].out_stop
    size = 170.0
    cell = size / max(n_in, n_out)
    width, height = n_in * cell, n_out * cell
    y = y0 + 20
    parts.append(_text(x0, y0 - 8, f"zoom: first {len(shown)} groups", size=11, weight="bold"))
    parts.append(_text(x0, y0 + 8, f"in 0..{n_in - 1} across, out 0..{n_out - 1} down", size=10,
                       fill="#555"))  # fmt: skip
    parts.append(
        f"<rect class='zoom-frame' x='{x0:.1f}' y='{y:.1f}' width='{width:.1f}' "
        f"height='{height:.1f}' fill='#e8e8e8' stroke='#888'/>"
    )
    for r in shown:
        colour = group_colour(r.index, spec.groups)
        parts.append(_group_open(r, colour, css="zoom-group"))
        parts.append(
            f"<rect x='{x0 + r.in_start * cell:.1f}' y='{y + r.out_start * cell:.1f}' "
            f"width='{(r.in_stop - r.in_start) * cell:.1f}' "
            f"height='{(r.out_stop - r.out_start) * cell:.1f}' stroke='white' stroke-width='1'/>"
        )
        parts.append("</g>")
        if (r.in_stop - r.in_start) * cell >= 16:
            parts.append(_text(x0 + (r.in_start + r.in_stop) * cell / 2,
                               y + (r.out_start + r.out_stop) * cell / 2 + 4, f"g{r.index}",
                               size=10, anchor="middle", fill="white", weight="bold"))  # fmt: skip
    return y + height + 4


def _legend(spec: ConvSpec, ranges: list[GroupRange], top: float) -> tuple[list[str], float]:
    shown: list[GroupRange | None] = list(ranges)
    if len(ranges) > MAX_LEGEND_GROUPS:
        shown = [*ranges[:3], None, ranges[-1]]
    parts = []
    y = top + 12
    for r in shown:
        if r is None:
            parts.append(_text(44, y, f"... {spec.groups - 4} more groups, same pattern ...",
                               size=12, fill="#555"))  # fmt: skip
            y += 18
            continue
        colour = group_colour(r.index, spec.groups)
        parts.append(
            f"<rect class='swatch' data-group='{r.index}' x='20' y='{y - 11:.1f}' width='14' "
            f"height='14' fill={quoteattr(colour)}/>"
        )
        parts.append(
            _text(44, y, f"group {r.index}: input channels [{r.in_start}:{r.in_stop}) -> "
                  f"output channels [{r.out_start}:{r.out_stop}), weight "
                  f"W[{r.weight_start}:{r.weight_stop}]", size=12)
        )  # fmt: skip
        y += 18
    return parts, y + 6
