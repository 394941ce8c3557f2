"""The CUDA kernels of our grouped and depthwise schedules compute what onnxruntime computes.

No GPU: each case builds a one-conv ONNX model (seeded random weights and input, fused bias and
epilogue), takes the CUDA C that TVM generates for it at sm_90 with the launch grid and block
of the lowered TIR (``tvm_schedules.cuda_kernels``), compiles it with g++ and the host header
``tests/cuda_host/include/cuda_host.h`` and runs it over its grid: blocks one after another,
each block's threads as fibers that meet at every ``__syncthreads()``. Every barrier phase runs
its threads first-to-last and then, in a second run, last-to-first; shared memory and the
output start as NaN bytes. float16 models are compared with onnxruntime running the same values
in float32, both as the pipeline builds them today (float16 accumulators) and with
``cuda_accumulate``'s float32 accumulation (``float16-acc32``, tighter tolerance).

Planted bugs must fail: every barrier removed, the barrier that protects a shared tile from the
next stage's load removed, the grid one block short, the input tile one load short.

The tensor-core kernels (``cuda_tensorcore``, float16 grouped convs accumulated in float32) call
``nvcuda::wmma``; ``tests/cuda_host/include/mma.h`` emulates it (every lane holds the whole
16x16 tile) and counts pointers and strides a GPU would reject; their cases and planted bugs are
in ``test_cuda_tensorcore.py``.

What the harness cannot execute (g++ rejects it, the case fails loudly rather than passing):
warp shuffles and votes, atomics, inline PTX (``mma.sync``, ``ldmatrix``, ``cp.async``),
textures. The schedules use none of them; how fast the WMMA instructions run, and that the
fragments' real lane layout changes nothing, only a GPU shows (the GPU kit).
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from builders import init, make_model, rng, tensor_info
from onnx import TensorProto, helper

pytest.importorskip("tvm")

from cuda_host import harness  # noqa: E402

from gconv_compile.tvm_schedules.cuda_accumulate import (  # noqa: E402
    accumulate_grouped_conv_in_float32,
)
from gconv_compile.tvm_schedules.cuda_kernels import conv_kernels  # noqa: E402

if harness.compiler() is None:
    pytest.skip("no g++ to compile the CUDA C for the CPU", allow_module_level=True)

ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
TOL = {"float32": dict(rtol=1e-4, atol=1e-4), "float16": dict(rtol=2e-2, atol=2e-2)}


def conv_case(c_in, c_out, size, *, group, kernel=3, stride=1, dilation=1, pads=None,
              epilogue="relu", bias=True, dtype="float32", seed=0, batch=1):  # fmt: skip
    """A one-conv model in ``dtype``, its float32 twin for onnxruntime, and the input."""
    r = rng(seed)
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    pads = pads if pads is not None else [dilation * (k[0] // 2), dilation * (k[1] // 2)] * 2
    fan_in = c_in // group * k[0] * k[1]
    weight = (r.standard_normal((c_out, c_in // group, *k)) / np.sqrt(fan_in)).astype(dtype)
    values = {"W": weight, "B": r.standard_normal(c_out).astype(dtype)}
    x = r.standard_normal((batch, c_in, *size)).astype(dtype)

    def model(elem_dtype: str):
        names = ["X", "W", "B"] if bias else ["X", "W"]
        nodes = [helper.make_node("Conv", names, ["C"], group=group, kernel_shape=list(k),
                                  strides=[stride] * 2, dilations=[dilation] * 2, pads=pads)]  # fmt: skip
        y = "C"
        if epilogue in ("relu", "residual"):
            if epilogue == "residual":
                nodes.append(helper.make_node("Add", ["C", "X"], ["S"]))
                y = "S"
            nodes.append(helper.make_node("Relu", [y], ["Y"]))
            y = "Y"
        inits = [init(n, values[n].astype(elem_dtype)) for n in names[1:]]
        elem = ELEM[elem_dtype]
        outputs = [helper.make_tensor_value_info(y, elem, [None] * 4)]
        return make_model(nodes, [tensor_info("X", list(x.shape), elem)], outputs, inits)

    return model(dtype), model("float32"), x


def reference(model_f32, x) -> np.ndarray:
    session = ort.InferenceSession(model_f32.SerializeToString(),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    return session.run(None, {"X": x.astype(np.float32)})[0]


def expected_schedule(case: dict, dtype: str) -> str:
    """The schedule the pipeline picks: depthwise, or for a grouped conv the tensor-core form
    when it is float16 (the CUDA pipeline always accumulates those in float32) and
    ``cuda_plan.plan`` prefers it."""
    from gconv_compile.cuda_plan import plan

    if case["group"] == case["c_in"] == case.get("c_out", case["c_in"]):
        return "cuda-depthwise-spatial"
    if dtype.startswith("float16"):
        k = case.get("kernel", 3)
        taps = k * k if isinstance(k, int) else k[0] * k[1]
        group = case["group"]
        chosen = plan(group, case["c_out"] // group, case["c_in"] // group, taps,
                      _out_pixels(case))  # fmt: skip
        if chosen.chosen:
            return "cuda-grouped-tensorcore"
    return "cuda-grouped-igemm"


def _out_pixels(case: dict) -> int:
    """N x OH x OW of a ``conv_case``."""
    k = case.get("kernel", 3)
    k = (k, k) if isinstance(k, int) else k
    d, s = case.get("dilation", 1), case.get("stride", 1)
    pads = case.get("pads") or [d * (k[0] // 2), d * (k[1] // 2)] * 2
    size = case["size"]
    oh = (size[0] + pads[0] + pads[2] - d * (k[0] - 1) - 1) // s + 1
    ow = (size[1] + pads[1] + pads[3] - d * (k[1] - 1) - 1) // s + 1
    return case.get("batch", 1) * oh * ow


def the_kernel(model, schedule: str, before: tuple = ()):
    kernels = conv_kernels(model, before=before)
    assert [k.schedule for k in kernels] == [schedule], [k.detail for k in kernels]
    return kernels[0]


def run(kernel, x, *, source=None, grid=None, order=0) -> np.ndarray:
    outputs = harness.build(kernel, source).run({"X": x}, order=order, grid=grid)
    (out,) = outputs.values()
    return out.astype(np.float32)


GROUPED = [
    pytest.param(dict(c_in=32, c_out=32, size=(9, 9), group=2), id="g2-9x9-odd"),
    pytest.param(dict(c_in=32, c_out=32, size=(10, 10), group=8, stride=2), id="g8-s2"),
    pytest.param(dict(c_in=64, c_out=64, size=(7, 7), group=16), id="g16-4ch-7x7"),
    pytest.param(dict(c_in=16, c_out=32, size=(6, 11), group=4), id="g4-widening-6x11"),
    pytest.param(dict(c_in=24, c_out=24, size=(12, 12), group=3, dilation=2), id="g3-dilation2"),
    pytest.param(
        dict(c_in=16, c_out=16, size=(8, 8), group=4, kernel=1, pads=[0] * 4), id="g4-1x1"
    ),  # fmt: skip
    pytest.param(
        dict(
            c_in=12,
            c_out=12,
            size=(9, 7),
            group=2,
            kernel=(3, 5),
            stride=2,
            pads=[0, 1, 2, 1],
            epilogue="none",
            bias=False,
        ),
        id="g2-3x5-s2-asym-pad",
    ),  # fmt: skip
    pytest.param(
        dict(c_in=32, c_out=32, size=(8, 8), group=8, epilogue="residual"), id="g8-residual"
    ),  # fmt: skip
    pytest.param(dict(c_in=128, c_out=128, size=(7, 7), group=4), id="g4-32ch-7x7"),
    pytest.param(dict(c_in=16, c_out=16, size=(5, 5), group=4, batch=3), id="g4-batch3"),
    pytest.param(dict(c_in=1024, c_out=64, size=(4, 4), group=2), id="g2-512ch-staged"),
]
DEPTHWISE = [
    pytest.param(dict(c_in=32, c_out=32, size=(14, 14), group=32), id="dw-14x14"),
    pytest.param(dict(c_in=16, c_out=16, size=(15, 15), group=16, stride=2), id="dw-15x15-s2"),
    pytest.param(dict(c_in=48, c_out=48, size=(7, 7), group=48), id="dw-7x7"),
    pytest.param(
        dict(c_in=8, c_out=8, size=(11, 11), group=8, kernel=5, dilation=2), id="dw-5x5-dilation2"
    ),  # fmt: skip
]
# float16-acc32: float16 convs accumulated in float32 (cuda_accumulate's pass before legalizing)
DTYPES = ["float32", "float16", "float16-acc32"]
TOL["float16-acc32"] = dict(rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GROUPED + DEPTHWISE)
def test_kernel_matches_onnxruntime(case, dtype):
    model, model_f32, x = conv_case(**case, dtype=dtype.removesuffix("-acc32"))
    schedule = expected_schedule(case, dtype)
    before = (accumulate_grouped_conv_in_float32,) if dtype.endswith("-acc32") else ()
    kernel = the_kernel(model, schedule, before)
    ref = reference(model_f32, x)
    for order in (0, 1):
        np.testing.assert_allclose(run(kernel, x, order=order), ref, **TOL[dtype],
                                   err_msg=f"{kernel.detail}, order {order}")  # fmt: skip


def test_channel_multiplier_groups_equal_channels():
    """groups = C_in with 2 outputs per group: the grouped kernel, one input channel per group."""
    model, model_f32, x = conv_case(8, 16, (9, 9), group=8)
    kernel = the_kernel(model, "cuda-grouped-igemm")
    np.testing.assert_allclose(run(kernel, x), reference(model_f32, x), **TOL["float32"])


def test_cases_cover_every_tile_form():
    """The grouped cases reach each way the schedule tiles: a block inside a group, whole
    groups per block, input channels in several shared stages, the reduction split over
    threads."""
    forms = set()
    for param in GROUPED:
        kernel = the_kernel(conv_case(**param.values[0])[0], "cuda-grouped-igemm")
        detail = kernel.detail
        tile_ch = int(re.search(r"block tile (\d+) ch", detail).group(1))
        per_group = param.values[0]["c_out"] // param.values[0]["group"]
        forms.add("inside a group" if tile_ch <= per_group else "whole groups")
        stage = int(re.search(r"(\d+) input ch per shared stage", detail).group(1))
        forms.add("staged" if stage < param.values[0]["c_in"] // param.values[0]["group"] else "")
        forms.add("split" if "reduction split" in detail else "")
    assert forms >= {"inside a group", "whole groups", "staged", "split"}, forms


# ------------------------------------------------------------------------------- planted bugs


def _barriers(source: str) -> list[re.Match]:
    return list(re.finditer(r"__syncthreads\(\);", source))


def _drop(source: str, match: re.Match) -> str:
    return source[: match.start()] + source[match.end() :]


def _mismatch(kernel, x, ref, **edit) -> bool:
    """True when some order of the edited kernel differs from onnxruntime."""
    for order in (0, 1):
        out = run(kernel, x, order=order, **edit)
        if not np.allclose(out, ref, **TOL["float32"], equal_nan=False):
            return True
    return False


PLANTED = [  # a split reduction (3 barriers), input channels in stages (2), depthwise (1)
    pytest.param(dict(c_in=64, c_out=64, size=(9, 9), group=2), id="grouped-split"),
    pytest.param(dict(c_in=1024, c_out=64, size=(4, 4), group=2), id="grouped-staged"),
    pytest.param(dict(c_in=32, c_out=32, size=(14, 14), group=32), id="depthwise"),
]


@pytest.mark.parametrize("case", PLANTED)
def test_missing_barriers_fail(case):
    model, model_f32, x = conv_case(**case)
    kernel = the_kernel(model, "cuda-grouped-igemm" if case["group"] == 2 else
                        "cuda-depthwise-spatial")  # fmt: skip
    ref = reference(model_f32, x)
    assert not _mismatch(kernel, x, ref), "the unedited kernel must match"
    barriers = _barriers(kernel.source)
    assert barriers, "the kernel has no barrier to remove"
    source = kernel.source
    for match in reversed(barriers):
        source = _drop(source, match)
    assert _mismatch(kernel, x, ref, source=source)
    # each barrier alone is needed: the one before a stage's load (the previous stage may still
    # be read) and the one after it (the stage may not be complete)
    for match in barriers:
        assert _mismatch(kernel, x, ref, source=_drop(kernel.source, match)), match.start()


@pytest.mark.parametrize("case", [PLANTED[0], PLANTED[2]])
def test_off_by_one_tiles_fail(case):
    model, model_f32, x = conv_case(**case)
    kernel = the_kernel(model, "cuda-grouped-igemm" if case["group"] == 2 else
                        "cuda-depthwise-spatial")  # fmt: skip
    ref = reference(model_f32, x)
    short_grid = (kernel.grid[0] - 1, *kernel.grid[1:])
    assert _mismatch(kernel, x, ref, grid=short_grid)
    # the first cooperative copy into shared memory (TVM names its loop ax0_..._fused) one short
    load = re.search(r"for \(int (ax0\w*) = 0; \1 < (\d+); \+\+\1\)", kernel.source)
    assert load is not None, "no cooperative load loop found in the kernel"
    bound = f"{load.group(1)} < {int(load.group(2)) - 1};"
    source = kernel.source.replace(f"{load.group(1)} < {load.group(2)};", bound, 1)
    assert _mismatch(kernel, x, ref, source=source)


# ------------------------------------------------------------------------- the build's own code


def _definitions(source: str) -> dict[str, str]:
    """Kernel name -> its definition, from CUDA C with several kernels."""
    found = {}
    for chunk in source.split('extern "C" __global__')[1:]:
        head, brace, body = chunk.partition("{")
        if brace:  # a definition, not the declaration before it
            name = re.findall(r"(\w+)\s*\(", head)[-1]
            found[name] = head + brace + body.split('extern "C"')[0]
    return found


def test_kernels_are_what_compile_emits(tmp_path, monkeypatch):
    """The kernels run here are the ones ``gconv-compile compile --emit-source`` writes."""
    import shutil

    from gconv_compile import compile as gconv_compile

    if shutil.which("nvcc") is None:
        pytest.skip("the CUDA build needs nvcc")
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    r = rng(3)
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["C1"], group=8, kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["C1"], ["R1"]),
        helper.make_node("Conv", ["R1", "W2"], ["Y"], group=32, kernel_shape=[3, 3], pads=[1] * 4),
    ]
    inits = [init("W1", r.standard_normal((32, 4, 3, 3)).astype(np.float32)),
             init("W2", r.standard_normal((32, 1, 3, 3)).astype(np.float32))]  # fmt: skip
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 4)]
    model = make_model(nodes, [tensor_info("X", [1, 32, 10, 10])], outputs, inits)
    ours = conv_kernels(model)
    assert sorted(k.schedule for k in ours) == ["cuda-depthwise-spatial", "cuda-grouped-igemm"]
    gconv_compile(model, "cuda", arch="sm_90", check=False, emit_source=tmp_path / "src")
    (emitted,) = (tmp_path / "src").glob("*.cu")
    built = _definitions(emitted.read_text())
    for kernel in ours:
        assert _definitions(kernel.source)[kernel.name] == built[kernel.name], kernel.name


# ------------------------------------------------------------------- the networks' own layers


def _network_layers():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cuda_static

    return [
        pytest.param(layer, id=f"{layer.network}-{layer.name}") for layer in cuda_static.layers()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16-acc32"])
@pytest.mark.parametrize("layer", _network_layers())
def test_network_layer_matches_onnxruntime(layer, dtype):
    """Every distinct grouped conv of ResNeXt-50 and depthwise conv of MobileNetV2, full size."""
    model, model_f32, x = conv_case(layer.channels, layer.channels, (layer.size, layer.size),
                                    group=layer.group, stride=layer.stride,
                                    dtype=dtype.removesuffix("-acc32"))  # fmt: skip
    case = dict(c_in=layer.channels, c_out=layer.channels, size=(layer.size, layer.size),
                group=layer.group, stride=layer.stride)  # fmt: skip
    schedule = expected_schedule(case, dtype)
    before = (accumulate_grouped_conv_in_float32,) if dtype.endswith("-acc32") else ()
    kernel = the_kernel(model, schedule, before)
    np.testing.assert_allclose(run(kernel, x), reference(model_f32, x), **TOL[dtype],
                               err_msg=kernel.detail)  # fmt: skip
