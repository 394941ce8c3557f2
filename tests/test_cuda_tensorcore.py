"""The tensor-core kernels for float16 grouped convs compute what onnxruntime computes.

``cuda_tensorcore`` legalises a float16 grouped conv (accumulated in float32) as a batched GEMM
of super-groups on WMMA 16x16x16 tiles. The generated CUDA C runs on the CPU through the same
harness as ``test_cuda_on_cpu.py``; ``tests/cuda_host/include/mma.h`` stands in for
``nvcuda::wmma`` (every lane holds the whole tile; misaligned pointers and strides counted).
Cases cover the packings (8, 4, 2, 1 group(s) per tile), 32 rows as two warps or two blocks,
the reduction split over warps, sizes that no tile divides, stride, dilation, batch, 1x1 and
3x5 kernels, and the epilogues; the float16
tolerance is the one of the float16-acc32 cases (float32 sums, one rounding at the store).

Planted bugs must fail: a barrier removed, a fragment stride off, the accumulator never filled.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_cuda_on_cpu import TOL, conv_case, reference, run, the_kernel

pytest.importorskip("tvm")

from cuda_host import harness  # noqa: E402

from gconv_compile import cuda_plan  # noqa: E402
from gconv_compile.tvm_schedules.cuda_accumulate import (  # noqa: E402
    accumulate_grouped_conv_in_float32,
)

if harness.compiler() is None:
    pytest.skip("no g++ to compile the CUDA C for the CPU", allow_module_level=True)

WIDEN = (accumulate_grouped_conv_in_float32,)
FORM = "cuda-grouped-tensorcore"
CASES = [  # each big enough for a full wave of blocks (smaller convs stay on CUDA cores)
    pytest.param(dict(c_in=128, c_out=128, size=(24, 22), group=32), id="kg4-pack4"),
    pytest.param(dict(c_in=256, c_out=256, size=(35, 35), group=32, stride=2), id="kg8-pack2-s2"),
    pytest.param(dict(c_in=512, c_out=512, size=(11, 13), group=32), id="kg16-11x13"),
    pytest.param(
        dict(c_in=1024, c_out=1024, size=(7, 7), group=32, epilogue="residual"),
        id="kg32-row-blocks-split-reduction-residual",
    ),  # fmt: skip
    pytest.param(
        dict(c_in=96, c_out=384, size=(9, 11), group=12, dilation=2, batch=2),
        id="kg32-dilation2-batch2",
    ),  # fmt: skip
    pytest.param(
        dict(
            c_in=128,
            c_out=128,
            size=(24, 24),
            group=32,
            kernel=1,
            pads=[0] * 4,
            epilogue="none",
            bias=False,
        ),
        id="kg4-pack4-1x1",
    ),  # fmt: skip
    pytest.param(
        dict(c_in=64, c_out=256, size=(18, 20), group=16, kernel=(3, 5), pads=[0, 1, 2, 1]),
        id="kg16-3x5-asym-pad",
    ),  # fmt: skip
    pytest.param(dict(c_in=64, c_out=128, size=(24, 24), group=64), id="multiplier2-pack8"),
]


def _kernel(case):
    model, model_f32, x = conv_case(**case, dtype="float16")
    return the_kernel(model, FORM, WIDEN), x, reference(model_f32, x)


@pytest.mark.parametrize("case", CASES)
def test_tensorcore_kernel_matches_onnxruntime(case):
    kernel, x, ref = _kernel(case)
    for order in (0, 1):
        np.testing.assert_allclose(run(kernel, x, order=order), ref, **TOL["float16-acc32"],
                                   err_msg=f"{kernel.detail}, order {order}")  # fmt: skip


def test_cases_cover_packings_and_tile_forms():
    packs, forms = set(), set()
    for param in CASES:
        kernel, _, _ = _kernel(param.values[0])
        packs.add(int(re.search(r"(\d+) group\(s\) per", kernel.detail).group(1)))
        forms.add("row blocks" if "rows in" in kernel.detail else "")
        forms.add("split" if "reduction split" in kernel.detail else "")
        forms.add("2 row warps" if re.search(r"\(2x\d+x\d+ warps\)", kernel.detail) else "")
    assert packs >= {1, 2, 4, 8}, packs
    assert forms >= {"row blocks", "split", "2 row warps"}, forms


def test_depthwise_float32_and_gate_failing_tiles_stay_on_cuda_cores():
    depthwise = cuda_plan.plan(32, 1, 1, 9, 196)
    assert not depthwise.chosen and "CUDA cores" in depthwise.describe()
    # too small to fill the SMs with 16x16 tiles; groups that do not pack into 16 rows
    small = cuda_plan.plan(8, 8, 8, 9, 100)
    assert small.tile is None and "no tensor-core tile" in small.describe()
    odd = cuda_plan.plan(3, 4, 4, 9, 10_000)
    assert not odd.chosen and "do not pack" in odd.describe()
    model, _, _ = conv_case(32, 32, (14, 14), group=32, dtype="float16")
    assert the_kernel(model, "cuda-depthwise-spatial", WIDEN).schedule == "cuda-depthwise-spatial"
    model, _, _ = conv_case(128, 128, (14, 14), group=32)  # float32: no WMMA for it here
    assert the_kernel(model, "cuda-grouped-igemm").schedule == "cuda-grouped-igemm"


# ------------------------------------------------------------------------------ planted bugs


def _fails(kernel, x, ref, source) -> bool:
    for order in (0, 1):
        try:
            out = run(kernel, x, order=order, source=source)
        except RuntimeError:
            return True
        if not np.allclose(out, ref, **TOL["float16-acc32"]):
            return True
    return False


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_missing_barriers_fail(case):
    kernel, x, ref = _kernel(case)
    assert not _fails(kernel, x, ref, kernel.source), "the unedited kernel must match"
    barriers = list(re.finditer(r"__syncthreads\(\);", kernel.source))
    assert len(barriers) >= 2
    everything = kernel.source
    for match in reversed(barriers):
        everything = everything[: match.start()] + everything[match.end() :]
    assert _fails(kernel, x, ref, everything)
    # the one after the shared-memory tiles are written (before the fragment loads), alone
    edited = kernel.source[: barriers[0].start()] + kernel.source[barriers[0].end() :]
    assert _fails(kernel, x, ref, edited)
    # those after the accumulators are stored, before other threads read them (one, or with a
    # split reduction's write-back several that each would do)
    stored = kernel.source.rindex("store_matrix_sync")
    edited = kernel.source
    for match in reversed([m for m in barriers if m.start() > stored]):
        edited = edited[: match.start()] + edited[match.end() :]
    assert _fails(kernel, x, ref, edited)


def test_bad_fragment_stride_and_missing_fill_fail():
    kernel, x, ref = _kernel(CASES[2].values[0])
    load = re.search(r"(load_matrix_sync\([^;]*, )(\d+)\);", kernel.source)
    assert load is not None
    off_by_one = kernel.source.replace(load.group(0),
                                       f"{load.group(1)}{int(load.group(2)) - 1});", 1)  # fmt: skip
    with pytest.raises(RuntimeError, match="WMMA"):
        run(kernel, x, source=off_by_one)
    no_fill = re.sub(r"nvcuda::wmma::fill_fragment\([^;]*\);", "", kernel.source)
    assert no_fill != kernel.source
    assert _fails(kernel, x, ref, no_fill)


def test_compile_cli_reports_the_tensor_core_choice(tmp_path, capsys):
    """``gconv-compile compile --target cuda`` on a float16 ResNeXt-style conv: the report says
    tensor cores and why; the CUDA C it emits calls the WMMA API."""
    import json

    import onnx

    from gconv_compile import cli

    model, _, _ = conv_case(512, 512, (14, 14), group=32, dtype="float16")
    path, report, source = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "src"
    onnx.save(model, path)
    code = cli.main(["compile", str(path), "--target", "cuda", "--arch", "sm_90", "--no-check",
                     "-o", str(tmp_path / "m.so"), "--report", str(report),
                     "--emit-source", str(source)])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "cuda-grouped-tensorcore (grouped conv 512->512 g32 3x3 s1 out 14x14 float16: " \
        "tensor cores:" in printed.out  # fmt: skip
    (schedule,) = json.loads(report.read_text())["schedules"]
    assert schedule["schedule"] == FORM
    assert "tensor cores" in schedule["detail"] and "estimate" in schedule["detail"]
    (emitted,) = source.glob("*.cu")
    assert "nvcuda::wmma::mma_sync" in emitted.read_text()


def test_weights_bound_at_run_time_stay_on_cuda_cores(tmp_path):
    """With ``--weights-file`` the weights are run-time inputs: repacking them for the tensor
    cores would cost a kernel launch per run, so the CUDA-core kernel takes the conv."""
    from gconv_compile.build import compile as build

    model, _, _ = conv_case(512, 512, (14, 14), group=32, dtype="float16")
    for weights, form in ((None, FORM), (tmp_path / "w.npz", "cuda-grouped-igemm")):
        built = build(model, "cuda", output=tmp_path / "m.so", arch="sm_90", check=False,
                      weights_file=weights)  # fmt: skip
        assert form in [s["schedule"] for s in built.report.extra["schedules"]]


def test_tensor_cores_can_be_turned_off(monkeypatch):
    """``GCONV_TENSOR_CORES=0``: the CUDA-core kernel (the GPU kit builds both forms)."""
    model, _, _ = conv_case(512, 512, (14, 14), group=32, dtype="float16")
    monkeypatch.setenv("GCONV_TENSOR_CORES", "0")
    assert the_kernel(model, "cuda-grouped-igemm").schedule == "cuda-grouped-igemm"


def test_symbolic_shapes_stay_on_cuda_cores():
    """A batch only known at run time: no tile can be chosen, TVM's own conv takes it."""
    model, _, _ = conv_case(512, 512, (14, 14), group=32, dtype="float16")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from gconv_compile.tvm_schedules import legalize_and_fuse
    from gconv_compile.tvm_schedules.cuda_kernels import cuda_target

    target = cuda_target()
    with target:
        mod = tvm.transform.Sequential(legalize_and_fuse(target))(
            from_onnx(model, keep_params_in_input=False))  # fmt: skip
    names = [str(gv.name_hint) for gv, _ in mod.functions_items()]
    assert not any("tensorcore" in n for n in names) and any("conv2d" in n for n in names)


def _random_cases(count: int, seed: int = 7) -> list[dict]:
    """Seeded grouped float16 convs that ``cuda_plan`` puts on tensor cores."""
    import random

    from test_cuda_on_cpu import _out_pixels

    r, cases = random.Random(seed), []
    while len(cases) < count:
        g, kg, cg = (
            r.choice([2, 4, 8, 16, 32]),
            r.choice([2, 4, 8, 16, 32]),
            r.choice([2, 4, 8, 16]),
        )
        k, size, stride = r.choice([1, 3]), r.choice([9, 14, 17, 20]), r.choice([1, 2])
        case = dict(c_in=g * cg, c_out=g * kg, size=(size, size), group=g, kernel=k,
                    stride=stride, batch=r.choice([1, 2]), pads=[k // 2] * 4)  # fmt: skip
        if cuda_plan.plan(g, kg, cg, k * k, _out_pixels(case)).chosen:
            cases.append(case)
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("case", _random_cases(12), ids=lambda c: (
    f"g{c['group']}-{c['c_in']}to{c['c_out']}-k{c['kernel']}-s{c['stride']}-"
    f"{c['size'][0]}px-b{c['batch']}"))  # fmt: skip
def test_random_shapes_match_onnxruntime(case):
    kernel, x, ref = _kernel(case)
    np.testing.assert_allclose(run(kernel, x), ref, **TOL["float16-acc32"], err_msg=kernel.detail)
