"""Read a convolution setting such as ``in=16,out=16,groups=2,kernel=3x3`` into a
:class:`~gconv_compile.explain_spec.ConvSpec`; every malformed spec is one clear UserError."""

from __future__ import annotations

import difflib

from gconv_compile.errors import UserError
from gconv_compile.explain_spec import ConvSpec

SPEC_EXAMPLE = "e.g. --conv in=16,out=16,groups=2,kernel=3x3"

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
_SIZE_KEYS = ("kernel", "stride", "dilation")


def parse_conv_spec(text: str, *, transpose: bool = False) -> ConvSpec:
    """Parse and validate ``in=16,out=16,groups=2,kernel=3x3,stride=2,dims=2``.

    ``in`` and ``out`` are required; ``groups`` defaults to 1, ``kernel`` to 1, ``stride`` and
    ``dilation`` to 1. ``dims`` (1, 2 or 3, default 2) sets the spatial rank when the kernel is
    given as one number; a kernel like ``3x3`` sets it on its own.

    Raises:
        UserError: A malformed spec, an unknown key, or a setting no framework accepts.
    """
    values = _key_values(text)
    missing = [k for k in ("in", "out") if k not in values]
    if missing:
        raise UserError(f"--conv needs {' and '.join(k + '=' for k in missing)}; {SPEC_EXAMPLE}")
    in_channels = _whole(values["in"], "in")
    out_channels = _whole(values["out"], "out")
    groups = _whole(values.get("groups", "1"), "groups")
    full = _spatial_sizes(values)
    return ConvSpec(
        in_channels, out_channels, groups, full["kernel"], full["stride"], full["dilation"],
        transpose,
    ).validate()  # fmt: skip


def _key_values(text: str) -> dict[str, str]:
    """``KEY=VALUE`` entries under their canonical key names."""
    values: dict[str, str] = {}
    if not text or not text.strip():
        raise UserError(f"--conv is empty; {SPEC_EXAMPLE}")
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise UserError(f"--conv '{text}': empty entry between commas; {SPEC_EXAMPLE}")
        if "=" not in item:
            raise UserError(f"--conv '{text}': '{item}' is not KEY=VALUE; {SPEC_EXAMPLE}")
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
            raise UserError(f"--conv: '{key}=' has no value; {SPEC_EXAMPLE}")
        values[canonical] = value
    return values


def _spatial_sizes(values: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """kernel, stride and dilation, each with one entry per spatial dim."""
    dims_given = "dims" in values
    dims = _whole(values.get("dims", "2"), "dims")
    if dims not in (1, 2, 3):
        raise UserError(f"dims={dims}: give 1, 2 or 3 spatial dims (Conv1d, Conv2d, Conv3d)")
    sizes = {key: _sizes(values.get(key, "1"), key) for key in _SIZE_KEYS}
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
    return {key: v * dims if len(v) == 1 else v for key, v in sizes.items()}


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
