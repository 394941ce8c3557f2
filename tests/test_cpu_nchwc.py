"""CPU builds: NCHW{v}c islands inside inverted residual blocks (``cpu_nchwc``).

Expand 1x1 -> depthwise 3x3 -> project 1x1, the 1x1 convs in the channel form: the two tensors
inside the block run NCHW16c (AVX-512; NCHW8c as AVX2 code), the expand conv storing whole
vectors, the depthwise conv on channel vectors; the block's input and output stay NCHW.
MobileNetV2 0.905x in the model (``benchmarks/model_ab.py``, one process, 2 threads, AVX-512
EPYC), its depthwise convs on 14x14 and 7x7 0.39-0.49x; a pixel-form expand conv (28x28 maps)
is rescheduled in the channel form inside an island (0.98x more). Every case against
onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest
from builders import init, make_model, rng, tensor_info
from onnx import helper
from test_schedules import F32, assert_close, compile_cpu, random_feeds, run_both

pytest.importorskip("tvm")


def inverted_residual(c: int = 64, expand: int = 6, size: int = 7, *, blocks: int = 2,
                      stride: int = 1, extra_user: bool = False, weights_as_inputs: bool = False,
                      batch: int | str = 1):  # fmt: skip
    """``blocks`` MobileNetV2 blocks (1x1 expand + ReLU6, depthwise 3x3 + ReLU6, 1x1 project,
    residual add when the stride is 1); ``extra_user``: the first expand output also feeds a
    second depthwise conv."""
    r = rng(91)
    e = c * expand
    nodes, inits, inputs = [], [], [tensor_info("X", [batch, c, size, size])]
    inits += [init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]
    x, outputs = "X", []

    def weight(name, shape):
        w = (r.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        if weights_as_inputs:
            inputs.append(tensor_info(name, list(shape)))
        else:
            inits.append(init(name, w))
        inits.append(init(f"{name}b", r.standard_normal(shape[0]).astype(np.float32)))

    for i in range(blocks):
        s = stride if i == 0 else 1
        weight(f"We{i}", (e, c, 1, 1))
        weight(f"Wd{i}", (e, 1, 3, 3))
        weight(f"Wp{i}", (c, e, 1, 1))
        depthwise = f"D{i}"
        nodes += [
            helper.make_node("Conv", [x, f"We{i}", f"We{i}b"], [f"E{i}"]),
            helper.make_node("Clip", [f"E{i}", "lo", "hi"], [f"Er{i}"]),
            helper.make_node("Conv", [f"Er{i}", f"Wd{i}", f"Wd{i}b"], [f"D{i}"], group=e,
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[s, s]),
        ]  # fmt: skip
        if extra_user and i == 0:  # a second depthwise conv reads the expand output too
            weight("Wx", (e, 1, 3, 3))
            nodes += [
                helper.make_node("Conv", ["Er0", "Wx", "Wxb"], ["Dx"], group=e,
                                 kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[s, s]),
                helper.make_node("Add", ["D0", "Dx"], ["Ds"]),
            ]  # fmt: skip
            depthwise = "Ds"
        nodes += [
            helper.make_node("Clip", [depthwise, "lo", "hi"], [f"Dr{i}"]),
            helper.make_node("Conv", [f"Dr{i}", f"Wp{i}", f"Wp{i}b"], [f"P{i}"]),
        ]
        if s == 1:
            nodes.append(helper.make_node("Add", [f"P{i}", x], [f"S{i}"]))
            x = f"S{i}"
        else:
            x = f"P{i}"
    outputs.insert(0, helper.make_tensor_value_info(x, F32, [None] * 4))
    return make_model(nodes, inputs, outputs, inits)


def _island_roles(decisions, v: int) -> list[str]:
    details = " | ".join(d.detail for d in decisions)
    return [role for role in (f"output NCHW{v}c", f"NCHW{v}c channel-vector form", f"input NCHW{v}c")
            if role in details]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "mcpu", "v"),
    [(dict(), None, 16), (dict(size=14), None, 16), (dict(stride=2, size=14, blocks=1), None, 16),
     (dict(c=32, size=28), None, 16), (dict(), "haswell", 8)],
    ids=["7x7-two-blocks", "14x14-two-blocks", "stride-2", "28x28-expand-rescheduled",
         "avx2-nchw8c"],
)  # fmt: skip
def test_inverted_residual_blocks_run_nchwc_inside(kwargs, mcpu, v):
    from gconv_compile.tvm_schedules import cpu

    spec = cpu.host_target()
    if mcpu is None and cpu.vector_lanes(__import__("tvm").target.Target(spec))[0] != v:
        pytest.skip("this host's vectors are not 16 floats")
    model = inverted_residual(**kwargs)
    vm, decisions = compile_cpu(model, mcpu=mcpu)
    roles = _island_roles(decisions, v)
    assert len(roles) == 3, [d.line() for d in decisions]
    expand = [d for d in decisions if f"output NCHW{v}c" in d.detail]
    assert expand and all(f"channel form: {v}-wide" in d.detail for d in expand), expand
    out, ref = run_both(model, random_feeds(model, seed=92), vm)
    assert_close(out, ref, F32)


@pytest.mark.parametrize(
    "kwargs",
    [dict(extra_user=True, blocks=1), dict(weights_as_inputs=True), dict(batch="N")],
    ids=["expand-output-has-another-user", "weights-as-inputs", "symbolic-batch"],
)
def test_blocks_that_cannot_change_layout_stay_nchw(kwargs):
    model = inverted_residual(**kwargs)
    vm, decisions = compile_cpu(model)
    assert not _island_roles(decisions, 16) and not _island_roles(decisions, 8), [
        d.line() for d in decisions
    ]
    out, ref = run_both(model, random_feeds(model, seed=93), vm)
    assert_close(out, ref, F32)


def test_gconv_nchwc_0_turns_the_islands_off(monkeypatch):
    monkeypatch.setenv("GCONV_NCHWC", "0")
    model = inverted_residual()
    vm, decisions = compile_cpu(model)
    assert not _island_roles(decisions, 16) and not _island_roles(decisions, 8)
    out, ref = run_both(model, random_feeds(model, seed=94), vm)
    assert_close(out, ref, F32)


def test_a_pixel_form_expand_conv_is_rescheduled_in_the_channel_form(monkeypatch):
    model = inverted_residual(c=32, size=28)
    monkeypatch.setenv("GCONV_NCHWC", "0")
    _, plain = compile_cpu(model)
    expand_name = [d.function for d in plain if "dense conv 32->192" in d.detail]
    assert expand_name and all("pixel form" in d.detail for d in plain if d.function in expand_name)
    monkeypatch.setenv("GCONV_NCHWC", "1")
    vm, decisions = compile_cpu(model)
    (expand,) = [d for d in decisions if d.function in expand_name]
    assert "channel form" in expand.detail and "output NCHW" in expand.detail, expand.line()
    out, ref = run_both(model, random_feeds(model, seed=95), vm)
    assert_close(out, ref, F32)


def test_functions_shared_with_a_block_that_stays_nchw_are_cloned():
    """Two same-shape blocks share their 1x1 convs; the first cannot change layout (its expand
    output has a second user), so the second block's call sites get NCHW16c clones and the
    first keeps the NCHW functions."""
    model = inverted_residual(extra_user=True, blocks=2)
    vm, decisions = compile_cpu(model)
    clones = [d for d in decisions if d.function.endswith(("_nchw16c", "_nchw8c"))]
    assert len(clones) == 2, [d.line() for d in decisions]  # expand and project
    assert len(_island_roles(clones, 16) + _island_roles(clones, 8)) == 2
    originals = {d.function[: d.function.rindex("_nchw")] for d in clones}
    plain = [d for d in decisions if d.function in originals]
    assert len(plain) == 2 and not _island_roles(plain, 16) and not _island_roles(plain, 8)
    out, ref = run_both(model, random_feeds(model, seed=96), vm)
    assert_close(out, ref, F32)


def test_compile_and_verify_cli_with_islands(tmp_path, capsys):
    """``gconv-compile compile --target llvm`` then ``verify``: the console and the report name
    the NCHW16c (or NCHW8c) functions, and the library matches onnxruntime."""
    import json

    import onnx

    from gconv_compile import cli

    model = inverted_residual(size=14)
    path, lib, report = tmp_path / "m.onnx", tmp_path / "m.so", tmp_path / "r.json"
    onnx.save(model, path)
    code = cli.main(["compile", str(path), "--target", "llvm", "-o", str(lib),
                     "--report", str(report)])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "channel-vector form (input and output)" in printed.out, printed.out
    details = [s["detail"] for s in json.loads(report.read_text())["schedules"]]
    assert any("output NCHW" in d for d in details) and any("input NCHW" in d for d in details)
    assert cli.main(["verify", str(path), "--lib", str(lib)]) == 0, capsys.readouterr().out
