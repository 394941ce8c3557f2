"""Explain a model's convolutions: :func:`explain_model` returns a :class:`ModelExplanation`.

It lists every Conv/ConvTranspose (subgraphs and functions included) with its cost at the
model's static shapes (symbolic dims stay as names), runs the fold pass on a copy to say which
split-conv-concat blocks would fold and why not, and flags depthwise + pointwise pairs
(depthwise-separable convolutions) with their saving against one dense convolution. The model
itself is never changed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
from onnx_ir import external_data as ir_external_data

from gconv_compile.errors import UserError, one_line
from gconv_compile.explain_format import collapse, join_x
from gconv_compile.explain_spec import ConvSpec
from gconv_compile.passes import FoldSliceBounds, FoldSplitConvConcat
from gconv_compile.passes._common import attr_int, graph_scopes, int_list, is_onnx_op, node_label
from gconv_compile.passes._geometry import CONV, CONV_TRANSPOSE, ConvGeometry
from gconv_compile.passes._shapes import ShapeFacts
from gconv_compile.passes.fold_split_conv_concat import ELEMENTWISE_ACTIVATIONS

logger = logging.getLogger(__name__)

# Conv -> [BatchNorm] -> [activation] -> ... -> 1x1 Conv: nodes looked through at most.
_SEPARABLE_HOPS = 4


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
            self.dilations, self.op_type == CONV_TRANSPOSE,
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
        listed = ", ".join("..." if n is None else n for n in collapse(names))
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
        """The human form: the table of convolutions, then the blocks, then the pairs."""
        return [
            *_conv_lines(self.path, self.rows),
            "",
            *_block_lines(self.blocks, self.fold_error),
            *_separable_lines(self.separable),
        ]


# ------------------------------------------------------------------------------ text form


def _conv_lines(path: str | None, rows: list[ConvRow]) -> list[str]:
    counts: dict[str, int] = {}
    for row in rows:
        kind = "unknown" if row.kind == "?" else row.kind.split(",")[0]
        counts[kind] = counts.get(kind, 0) + 1
    tally = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    lines = [
        f"{path or 'model'}: {len(rows)} Conv/ConvTranspose" + (f" ({tally})" if tally else "")
    ]
    if not rows:
        return lines
    lines.append("")
    lines.extend(_table(rows))
    total_params = sum(r.params or 0 for r in rows)
    unknown = sum(r.params is None for r in rows)
    lines.append(
        f"total: {total_params:,} parameters, {_total_cost(rows)} multiply-adds"
        + (f" ({_plural(unknown, 'Conv')} of unknown weight shape not counted)" if unknown else "")
    )
    for row in rows:
        if row.kind == "invalid":
            lines.append(
                f"invalid: {row.label} has in={row.in_channels}, out={row.out_channels}, "
                f"group={row.group}; see `gconv-compile explain {path or 'MODEL'} "
                f"--node {row.label}`"
            )
    return lines


def _block_lines(blocks: list[dict[str, Any]], fold_error: str | None) -> list[str]:
    if fold_error:
        return [
            f"split-conv-concat blocks: unknown, the fold pass failed ({fold_error}); "
            "please report it"
        ]
    if not blocks:
        return ["split-conv-concat blocks: none"]
    lines = [f"split-conv-concat blocks ({len(blocks)}):"]
    for block in blocks:
        where = f"{block['scope']}/{block['anchor']}" if block["scope"] else block["anchor"]
        if block["would_fold"]:
            lines.append(f"  {where}: would fold: {block['summary']}")
        else:
            lines.append(f"  {where}: would NOT fold: {block['reason']}")
    return lines


def _separable_lines(separable: list[dict[str, Any]]) -> list[str]:
    if not separable:
        return []
    lines = ["", f"depthwise-separable pairs ({len(separable)}):"]
    for pair in separable:
        kernel = join_x(pair["kernel"])
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


# -------------------------------------------------------------------------------- costs


def _dim(d: Any) -> int | str | None:
    """An int, a symbolic name, or None for a dim nobody named."""
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    return value if isinstance(value, str) and value else None


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


# ------------------------------------------------------------------------------ the model


def explain_model(loaded) -> ModelExplanation:
    """Describe every Conv/ConvTranspose of ``loaded.model`` (a LoadedModel); the model is unchanged."""
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
            if is_onnx_op(node, CONV, CONV_TRANSPOSE):
                row = _conv_row(label, node, facts)
                rows.append(row)
                nodes[id(node)] = row
    fold_error = None
    try:
        blocks = _fold_preview(loaded)
    except Exception as exc:  # a bug in the pass must not hide the table it does not affect
        logger.debug("fold preview failed", exc_info=True)  # the output says so; no traceback
        blocks = []
        fold_error = f"{type(exc).__name__}: {one_line(exc, limit=200)}"
    separable = _separable_pairs(model, nodes)
    path = None if loaded.path is None else str(loaded.path)
    return ModelExplanation(path, rows, blocks, separable, fold_error)


def _conv_row(scope: str, node: ir.Node, facts: ShapeFacts) -> ConvRow:
    group = attr_int(node, "group", 1)
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    wshape = facts.shape(weight) if weight is not None else None
    dims = [_dim(d) for d in wshape] if wshape is not None else None
    geometry = None
    if dims is not None and len(dims) >= 3 and all(isinstance(d, int) for d in dims[:2]):
        geometry = ConvGeometry.from_weight(node.op_type, dims[:2], group)
    in_channels = None if geometry is None else geometry.in_channels
    out_channels = None if geometry is None else geometry.out_channels
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
    macs = None
    if params is not None:
        # Every weight is one multiply-add per pixel of the side it slides over: the output
        # for Conv, the input for ConvTranspose (which scatters each input pixel).
        side = node.inputs[0] if node.op_type == CONV_TRANSPOSE else node.outputs[0]
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
        kind="?" if geometry is None else geometry.kind,
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


# ------------------------------------------------------------------- depthwise-separable


def _separable_pairs(model: ir.Model, rows: dict[int, ConvRow]) -> list[dict[str, Any]]:
    """Depthwise Convs whose output (through BatchNorm/activations) feeds a 1x1 dense Conv."""
    pairs = []
    for _scope, graph, _in_function in graph_scopes(model):
        for node in graph:
            row = rows.get(id(node))
            if row is None or row.op_type != CONV or not row.kind.startswith("depthwise"):
                continue
            pointwise = _conv_fed_by(node)
            pw = rows.get(id(pointwise)) if pointwise is not None else None
            if pw is None or pw.group != 1 or not pw.kernel or any(k != 1 for k in pw.kernel):
                continue
            if any(st != 1 for st in pw.strides) or pw.params is None or row.params is None:
                continue
            pairs.append(_separable_pair(row, pw))
    return pairs


def _conv_fed_by(node: ir.Node) -> ir.Node | None:
    """The Conv that alone reads ``node``'s output, through BatchNorm and activations."""
    value = node.outputs[0]
    for _ in range(_SEPARABLE_HOPS):
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return None
        user = uses[0].node
        if is_onnx_op(user, CONV) and uses[0].idx == 0:
            return user
        if user.domain not in ("", "ai.onnx") or not (
            user.op_type == "BatchNormalization" or user.op_type in ELEMENTWISE_ACTIVATIONS
        ):
            return None
        value = user.outputs[0]
    return None


def _separable_pair(row: ConvRow, pw: ConvRow) -> dict[str, Any]:
    """A depthwise ``row`` and its pointwise ``pw``, against one dense Conv from in to out."""
    dw_weights = math.prod(row.weight_shape)
    pw_weights = math.prod(pw.weight_shape)
    # One dense Conv with the depthwise kernel, straight from in to the pointwise out;
    # it gets a bias exactly when the pointwise Conv has one.
    dense = ConvGeometry(CONV, row.in_channels, pw.out_channels, 1, row.kernel)
    dense_weights = math.prod(dense.weight_shape)
    dense_params = dense_weights + (pw.params - pw_weights)
    macs = dense_macs = None
    if row.macs is not None and pw.macs is not None and pw.macs.symbols == row.macs.symbols:
        pixels = row.macs.coefficient // dw_weights
        macs = Cost(row.macs.coefficient + pw.macs.coefficient, row.macs.symbols)
        dense_macs = Cost(dense_weights * pixels, row.macs.symbols)
    return {
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
    }  # fmt: skip
