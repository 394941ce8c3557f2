"""Relax rewrite before legalisation: inference batch norm folded into the conv before it.

``batch_norm(conv2d(x, W) [+ b], gamma, beta, mean, var)[0]`` with every parameter a constant
becomes ``conv2d(x, W * s) + (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)`` per output
channel, as onnxruntime's and onnxsim's graph optimisers do. Left as elementwise arithmetic the
batch norm is four operations per output element in the conv's epilogue (subtract, two
multiplies, add); folded it is the bias add. ShuffleNet v1, whose convs carry no bias and
a batch norm each, ran 4% faster (``benchmarks/model_ab.py``, see ``docs/performance.md``).

The new weights and bias are computed in float64 and rounded once to the conv's dtype, so the
result differs from the unfolded arithmetic by float rounding only (each output is the same sum
of products with every weight scaled before instead of the sum scaled after). Only NCHW convs
with OIHW constant weights, a batch norm on axis 1 in inference mode and constant batch-norm
parameters are folded; weights bound as parameters (``--weights-file``) leave the batch norm
to the epilogue.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

_CONV = "relax.nn.conv2d"
_BN = "relax.nn.batch_norm"


def _constant(expr, values: dict) -> np.ndarray | None:
    """The value of a constant, or of a reshape of one (the importer's conv bias)."""
    if isinstance(expr, relax.Var):
        expr = values.get(expr, expr)
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    if _is_call(expr, "relax.reshape"):
        value = _constant(expr.args[0], values)
        shape = expr.args[1]
        if value is not None and isinstance(shape, relax.ShapeExpr):
            dims = [d.value if hasattr(d, "value") else None for d in shape.values]
            if None not in dims and int(np.prod(dims)) == value.size:
                return value.reshape(dims)
    return None


def _is_call(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


@relax.expr_functor.visitor
class VarUses(relax.PyExprVisitor):
    """How many times each variable is used (bindings not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict = {}

    def visit_var_(self, var):  # noqa: N802 - TVM's visitor naming
        self.counts[var] = self.counts.get(var, 0) + 1

    def visit_dataflow_var_(self, var):  # noqa: N802
        self.counts[var] = self.counts.get(var, 0) + 1


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    """Works on the original function's bindings (``values``, ``uses``): the conv it folds
    into is rebuilt on the rewritten input, so folds chain through a network."""

    values: dict = {}
    uses: dict = {}

    def _bound(self, expr):
        return self.values.get(expr, expr) if isinstance(expr, relax.Var) else expr

    def visit_tuple_getitem_(self, op):  # noqa: N802 - TVM's visitor naming
        bn = self._bound(op.tuple_value) if op.index == 0 else None
        folded = self._fold(bn) if _is_call(bn, _BN) else None
        return super().visit_tuple_getitem_(op) if folded is None else folded

    def _single_use(self, expr) -> bool:
        return not isinstance(expr, relax.Var) or self.uses.get(expr, 0) == 1

    def _conv_and_bias(self, expr):
        """(conv call, bias per output channel or None) feeding the batch norm and nothing
        else, else None."""
        if not self._single_use(expr):
            return None
        value = self._bound(expr)
        bias = None
        if _is_call(value, "relax.add"):
            lhs, rhs = (self._bound(a) for a in value.args)
            for conv, var, other in ((lhs, value.args[0], value.args[1]), (rhs, value.args[1], value.args[0])):  # fmt: skip
                if _is_call(conv, _CONV) and self._single_use(var):
                    bias = _constant(other, self.values)
                    value = conv
                    break
            if bias is None:
                return None
        if not _is_call(value, _CONV):
            return None
        return value, bias

    def _fold(self, bn):
        found = self._conv_and_bias(bn.args[0])
        if found is None:
            return None
        conv, bias = found
        attrs = conv.attrs
        if (attrs.data_layout, attrs.kernel_layout, str(attrs.out_layout)) != (
            "NCHW",
            "OIHW",
            "NCHW",
        ):
            return None
        weight = _constant(conv.args[1], self.values)
        if weight is None or weight.dtype.kind != "f" or weight.ndim != 4:
            return None
        if str(attrs.out_dtype) not in ("", "None", "void", str(weight.dtype)):
            return None
        if int(bn.attrs.axis) != 1 or bool(bn.attrs.training):
            return None
        channels = weight.shape[0]
        stats = [_constant(a, self.values) for a in bn.args[1:5]]
        if any(s is None or s.size != channels for s in stats):
            return None
        if bias is not None and bias.shape not in ((1, channels, 1, 1), (channels, 1, 1)):
            return None
        gamma, beta, mean, var = (s.astype(np.float64).reshape(channels) for s in stats)
        if not bn.attrs.scale:
            gamma = np.ones(channels)
        if not bn.attrs.center:
            beta = np.zeros(channels)
        scale = gamma / np.sqrt(var + float(bn.attrs.epsilon))
        shift = beta - mean * scale
        if bias is not None:
            shift = shift + bias.astype(np.float64).reshape(channels) * scale
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            return None
        new_weight = (weight.astype(np.float64) * scale[:, None, None, None]).astype(weight.dtype)
        new_shift = shift.astype(weight.dtype).reshape(1, channels, 1, 1)
        data = self.visit_expr(conv.args[0])
        out = relax.Call(conv.op, [data, relax.const(new_weight)], attrs)
        return relax.op.add(out, relax.const(new_shift))


@tvm.transform.module_pass(opt_level=0, name="GconvFoldBatchNorm")
def fold_batch_norm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Fold every foldable inference batch norm of ``mod``'s Relax functions into its conv."""
    folder = _Folder(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            counter = VarUses()
            counter.visit_expr(func)
            folder.uses = counter.counts
            folder.values = dict(relax.analysis.get_var2val(func))
            folder.builder_.update_func(gv, folder.visit_expr(func))
    mod = folder.builder_.get()
    return relax.transform.DeadCodeElimination()(mod)
