"""Explain the ``groups`` setting of a convolution, from its numbers or from a model.

Two questions come back again and again: what a given ``groups`` value does to the weight shape
and the channel wiring, and where a model's grouped convolutions are. :func:`run_explain` (the
``gconv-compile explain`` command) answers both; this module holds the command and re-exports
the public names of the modules that do the work, one job each:

* ``explain_spec``: :class:`ConvSpec` and :class:`GroupRange`, the data types every other module
  reads, built on the passes' one conv-geometry helper (``passes._geometry.ConvGeometry``);
  :meth:`ConvSpec.validate` refuses a setting no framework accepts with one paragraph that says
  why and what would work instead.
* ``explain_parse``: :func:`parse_conv_spec` turns ``in=16,out=16,groups=2,kernel=1`` into a
  validated :class:`ConvSpec`.
* ``explain_setting``: :func:`conv_lines` / :func:`conv_dict` describe one setting: weight shape
  in each framework's order, the channel range of every group, parameters and multiply-adds
  against the dense convolution, the equivalent split-conv-concat and its name in each framework.
* ``explain_model``: :func:`explain_model` lists every Conv/ConvTranspose of a model with its
  cost at the model's static shapes, runs the fold pass on a copy to say which
  split-conv-concat blocks would fold, and flags depthwise + pointwise pairs.
* ``explain_svg``: draws one setting's channel wiring (or its weight mask) as SVG.
* ``explain_format``: small text helpers the others share.

Imports go one way, ``explain`` -> ``explain_{parse,setting,model,svg}`` -> ``explain_spec`` ->
``explain_format``, so no module imports another inside a function.

Grouping in one picture (``in=4, out=4, groups=2``)::

    in 0 ─┬─ out 0        weight [4, 2, k, k]: rows 0-1 read input channels 0-1,
    in 1 ─┴─ out 1                           rows 2-3 read input channels 2-3
    in 2 ─┬─ out 2
    in 3 ─┴─ out 3
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gconv_compile.errors import UserError
from gconv_compile.explain_model import ConvRow, Cost, ModelExplanation, explain_model
from gconv_compile.explain_parse import SPEC_EXAMPLE, parse_conv_spec
from gconv_compile.explain_setting import (
    conv_dict,
    conv_lines,
    framework_names,
    keras_kernel_shape,
)
from gconv_compile.explain_spec import ConvSpec, GroupRange, invalid_groups_message, valid_groups
from gconv_compile.explain_svg import choose_mode, render_svg
from gconv_compile.files import write_text_atomic
from gconv_compile.model_io import load_model

__all__ = [
    "ConvRow",
    "ConvSpec",
    "Cost",
    "GroupRange",
    "ModelExplanation",
    "conv_dict",
    "conv_lines",
    "explain_model",
    "framework_names",
    "invalid_groups_message",
    "keras_kernel_shape",
    "parse_conv_spec",
    "run_explain",
    "valid_groups",
]


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
    _check_options(model, conv, transpose, node, svg)
    data: dict[str, Any]
    title = None
    if conv is not None:
        spec = parse_conv_spec(conv, transpose=transpose)
        lines, data = conv_lines(spec), conv_dict(spec)
    else:
        spec, title, lines, data = _explain_model_file(model, node, svg)
    if svg is not None and spec is not None:
        write_text_atomic(svg, render_svg(spec, title=title))
        data["svg"] = {"path": svg, "mode": choose_mode(spec)}
        lines += ["", f"wrote {svg} ({choose_mode(spec)} picture, {spec.groups} groups)"]
    if as_json:
        return json.dumps(data, indent=2)
    return "\n".join(lines)


def _check_options(
    model: str | None, conv: str | None, transpose: bool, node: str | None, svg: str | None
) -> None:
    if model is None and conv is None:
        raise UserError(f"explain needs MODEL.onnx or --conv SPEC; {SPEC_EXAMPLE}")
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


def _explain_model_file(
    model: str, node: str | None, svg: str | None
) -> tuple[ConvSpec | None, str | None, list[str], dict[str, Any]]:
    """(spec to draw, picture title, lines, data) for a model or one of its nodes."""
    explanation = explain_model(load_model(model))
    if node is None:
        if svg is not None:
            names = [row.label for row in explanation.rows if row.kind not in ("dense", "?")]
            hint = f" (grouped ones: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
            raise UserError(
                "--svg draws one convolution: add --node NAME" + (hint if names else "")
            )
        return None, None, explanation.lines(), explanation.to_dict()
    row = explanation.find(node)
    spec = row.spec()
    title = (
        f"{row.label} in {Path(model).name}: {spec.torch_layer}(in={spec.in_channels}, "
        f"out={spec.out_channels}, groups={spec.groups})"
    )
    lines = [f"node '{row.label}' ({row.op_type}) of {model}:", "", *conv_lines(spec)]
    data = {"model": model, "node": row.to_dict(), **conv_dict(spec)}
    return spec, title, lines, data


def _check_svg_path(path: str, model: str | None) -> None:
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--svg {path}: is a folder; give a file name such as groups.svg")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--svg {path}: folder '{parent}' does not exist")
    if model is not None and Path(model).exists() and target.resolve() == Path(model).resolve():
        raise UserError(f"--svg {path}: would overwrite the model; choose another path")
