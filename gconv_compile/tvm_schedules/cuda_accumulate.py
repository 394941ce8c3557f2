"""Grouped and depthwise float16 convs accumulate in float32 on CUDA (as cuDNN does).

A Relax pass for before ``LegalizeOps``::

    conv2d(x: f16, w: f16, groups=g > 1)            astype(conv2d(x, w, groups=g,
        -> f16                              ==>                  out_dtype="float32"), "float16")

LegalizeOps then writes the conv's reduction over float32 values of the float16 inputs, and
FuseOps puts the cast back to float16 into the conv's epilogue, so the CUDA schedules keep
float32 accumulators in registers (and partial sums in shared memory) and round once, at the
store. Dense convs (groups 1) are left to dlight's tensor-core Matmul rule, which chooses its own
accumulator.
"""

from __future__ import annotations

import tvm
from tvm import relax


@tvm.transform.module_pass(opt_level=0, name="AccumulateGroupedConvInFloat32")
def accumulate_grouped_conv_in_float32(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """The pass (see the module docstring)."""
    conv2d = tvm.ir.Op.get("relax.nn.conv2d")

    @relax.expr_functor.mutator
    class _Widen(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor naming
            call = super().visit_call_(call)
            if not (isinstance(call, relax.Call) and call.op.same_as(conv2d)):
                return call
            attrs = call.attrs
            dtype = str(call.args[0].ty.dtype) if hasattr(call.args[0].ty, "dtype") else ""
            if int(attrs.groups) == 1 or dtype != "float16":
                return call
            if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "void", "float16"):
                return call
            wide = relax.op.nn.conv2d(
                call.args[0], call.args[1], strides=attrs.strides, padding=attrs.padding,
                dilation=attrs.dilation, groups=attrs.groups, data_layout=attrs.data_layout,
                kernel_layout=attrs.kernel_layout, out_layout=attrs.out_layout,
                out_dtype="float32",
            )  # fmt: skip
            return relax.op.astype(wide, "float16")

    widen = _Widen(mod)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = widen.visit_expr(func)
    return out
