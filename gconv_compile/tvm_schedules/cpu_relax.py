"""Relax rewrites before legalisation, for llvm builds: arithmetic the importer spells slowly.

- ``divide(x, constant)`` -> ``multiply(x, 1 / constant)``: batch norm decomposed for inference
  divides by ``sqrt(var + eps)``, a constant once folded; a vector divide per output element
  costs as much as several FMAs of a 1x1 conv (ShuffleNet's convs carry one per BN).
- ``sum(stack([a, b, ...]), axis=0)`` -> ``a + b + ...``: the ONNX importer writes ``Sum`` that
  way, a reduction FuseOps cannot fuse with the Relu after it (ShuffleNet's residual adds were a
  stack-sum function and a Relu function each); an add fuses, often into the conv before it.
- ``Tuple(y, mean, var)[0]`` -> ``y`` (``CanonicalizeBindings``): batch norm decomposed for
  inference leaves that tuple, and FuseOps ends a group at it, so a residual add and Relu after a
  conv's batch norm ran as a function of their own (ShuffleNet v1: 1.86 instead of 2.20 ms).

The results equal the originals up to float rounding (x * (1/c) is within an ulp of x / c).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call):  # noqa: N802 - TVM's visitor naming
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return call
        new = None
        if call.op.name == "relax.divide":
            new = _reciprocal(call)
        elif call.op.name == "relax.sum":
            new = self._sum_of_stack(call)
        return call if new is None else new

    def _sum_of_stack(self, call):
        axis = call.attrs.axis
        if axis is None or [int(a) for a in axis] != [0] or call.attrs.keepdims:
            return None
        arg = call.args[0]
        bound = self.lookup_binding(arg) if isinstance(arg, relax.Var) else arg
        if not (isinstance(bound, relax.Call) and bound.op.same_as(tvm.ir.Op.get("relax.stack"))):
            return None
        if bound.attrs.axis is None or int(bound.attrs.axis) != 0:
            return None
        parts = bound.args[0]
        parts = self.lookup_binding(parts) if isinstance(parts, relax.Var) else parts
        if not isinstance(parts, relax.Tuple) or len(parts.fields) < 2:
            return None
        total = parts.fields[0]
        for part in parts.fields[1:]:
            total = relax.op.add(total, part)
        return total


def _reciprocal(call):
    divisor = call.args[1]
    if not isinstance(divisor, tvm.ir.expr.Constant):
        return None
    value = divisor.value.numpy()
    if value.dtype.kind != "f":
        return None
    if not np.all(np.isfinite(value)) or np.any(value == 0):
        return None
    inverse = (np.ones((), value.dtype) / value).astype(value.dtype)
    return relax.op.multiply(call.args[0], relax.const(inverse))


@tvm.transform.module_pass(opt_level=0, name="GconvCpuRelaxRewrites")
def cpu_relax_rewrites(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Apply the rewrites to every Relax function of ``mod``.

    First ``CanonicalizeBindings``: batch norm decomposed for inference leaves
    ``Tuple(y, mean, var)[0]``, and FuseOps ends a group at the tuple, so the residual add and
    Relu after a conv's batch norm got a function of their own (ShuffleNet v1's 13 units).
    """
    mod = relax.transform.CanonicalizeBindings()(mod)
    rewriter = _Rewriter(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()
