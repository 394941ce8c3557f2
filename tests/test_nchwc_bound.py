"""``benchmarks/nchwc_bound.py``: its NCHW{v}c variant of a channel-form conv computes the same
values, re-laid out, as the function ``compile`` builds (else its times bound nothing); and
``cpu_nchwc.schedule_depthwise`` alone, on shapes the models do not have."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_schedules import conv_model

pytest.importorskip("tvm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _run(func, target, args):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


@pytest.mark.parametrize(
    "kwargs",
    [dict(c_in=48, c_out=64, size=(7, 7), kernel=(1, 1), pads=(0,) * 4, epilogue="relu"),
     dict(c_in=32, c_out=32, size=(7, 7), kernel=(1, 1), pads=(0,) * 4, epilogue="residual"),
     dict(c_in=3, c_out=32, size=(18, 18), stride=2, epilogue="relu")],
    ids=["pointwise-relu", "pointwise-residual", "stem-3x3-s2"],
)  # fmt: skip
def test_blocked_variant_computes_the_same_outputs(kwargs):
    from cpu_functions import scheduled_module
    from nchwc_bound import _blocked

    model = conv_model(seed=81, **kwargs)
    target, mod, details, _, _ = scheduled_module(model, None)
    (name,) = [n for n, d in details.items() if "channel form" in d]
    func = mod[name]
    vector = int(details[name].split("channel form: ")[1].split("-wide")[0])
    blocked = _blocked(func, vector)
    rng = np.random.default_rng(82)
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    infos = ArgInfo.from_prim_func(func)
    args = [rng.standard_normal([int(d) for d in i.shape]).astype(i.dtype) for i in infos]
    out = _run(func, target, args)
    blocked_infos = ArgInfo.from_prim_func(blocked)
    blocked_args = []
    for arg, info in zip(args, blocked_infos, strict=True):
        shape = [int(d) for d in info.shape]
        if list(arg.shape) == shape:
            blocked_args.append(arg)
        else:  # NCHW -> NCHW{v}c (the output, and a residual operand)
            n, c, h, w = arg.shape
            blocked_args.append(
                arg.reshape(n, c // vector, vector, h, w).transpose(0, 1, 3, 4, 2).copy()
            )
    got = _run(blocked, target, blocked_args)
    n, c, h, w = out.shape
    want = out.reshape(n, c // vector, vector, h, w).transpose(0, 1, 3, 4, 2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("channels", "size", "stride"),
    [(32, (7, 7), 1), (48, (14, 14), 1), (32, (14, 14), 2), (16, (9, 11), 1)],
    ids=["7x7", "14x14", "14x14-s2", "odd-9x11"],
)
def test_depthwise_on_channel_vectors_computes_the_same_outputs(channels, size, stride):
    import tvm
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from gconv_compile import tvm_schedules
    from gconv_compile.tvm_schedules.cpu_nchwc import schedule_depthwise as schedule

    model = conv_model(channels, channels, size, group=channels, stride=stride, seed=83)
    target = tvm.target.Target(tvm_schedules.host_target())
    with target:
        fused = from_onnx(model, keep_params_in_input=False)
        fused = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(fused)
    (name,) = [
        str(gv.name_hint) for gv, f in fused.functions_items() if "conv2d" in str(gv.name_hint)
    ]
    func, v = fused[name], 16
    blocked = schedule(func, v)
    rng = np.random.default_rng(84)
    args = [rng.standard_normal([int(d) for d in i.shape]).astype(i.dtype)
            for i in ArgInfo.from_prim_func(func)]  # fmt: skip
    out = _run(func, target, args)

    def block(a, shape):
        if list(a.shape) == shape:  # bias (1, C, 1, 1) and scalars keep theirs
            return a
        if a.shape[1] == 1 and a.shape[0] == channels:  # weight (C, 1, kh, kw)
            c, i, kh, kw = a.shape
            return a.reshape(c // v, v, i, kh, kw).transpose(0, 2, 3, 4, 1).copy()
        n, c, h, w = a.shape
        return a.reshape(n, c // v, v, h, w).transpose(0, 1, 3, 4, 2).copy()

    shapes = [[int(d) for d in i.shape] for i in ArgInfo.from_prim_func(blocked)]
    got = _run(blocked, target, [block(a, s) for a, s in zip(args, shapes, strict=True)])
    np.testing.assert_allclose(got, block(out, None), rtol=1e-5, atol=1e-5)
