"""Static gates for the CUDA grouped and depthwise conv kernels (issue #13), without a GPU.

For every distinct grouped conv of ResNeXt-50 32x4d and depthwise conv of MobileNetV2, in
float32 and float16, the kernel our schedule generates for sm_90 is compiled with nvcc and read
back from ptxas and the SASS (``tvm_schedules.cuda_static``). Gates:

- no register spills;
- threads per block >= 64 and a multiple of 32;
- at least one full wave: blocks >= 132 (the H200's SMs);
- no guard in the hot FMA loop (conditional branch other than the back edge, predicated FMA);
- grouped kernels: <= 0.5 shared-memory loads per FMA, >= 40% of the loop's instructions FMAs
  (HMMAs counted as FMA instructions);
- tensor-core (MMA) loops also: no more warp instructions per HMMA.16816 than the clocks the
  tensor core needs for it (4.3 on an H200): the loop's loads and address arithmetic issue
  while the tensor cores work.

float16 kernels accumulate in float32 (``cuda_accumulate``'s pass, which ``legalize_and_fuse``
runs for CUDA targets).

The checks of the checker: a hand-written kernel with a guarded FMA loop, a spill and a small
block fails the same gates.

Needs nvcc (``CUDA_PATH``) and cuobjdump (``pip install nvidia-cuda-cuobjdump``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")

from gconv_compile.tvm_schedules import cuda_static  # noqa: E402
from gconv_compile.tvm_schedules.cuda_kernels import Kernel, KernelArg  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cuda_static as bench  # noqa: E402

TOOLS = cuda_static.toolkit()
needs_toolkit = pytest.mark.skipif(TOOLS is None, reason="no nvcc/cuobjdump (CUDA_PATH)")


def gate_failures(review: cuda_static.Review, kind: str) -> list[str]:
    k, loop, ptxas = review.kernel, review.loop, review.ptxas
    failures = []
    if ptxas.spill_stores or ptxas.spill_loads:
        failures.append(f"spills {ptxas.spill_stores}+{ptxas.spill_loads} bytes")
    if k.threads < 64 or k.threads % 32:
        failures.append(f"{k.threads} threads per block")
    if k.blocks < cuda_static.H200.sms:
        failures.append(f"{k.blocks} blocks for {cuda_static.H200.sms} SMs")
    if loop.guard_branches or loop.predicated_fmas:
        failures.append(f"{loop.guard_branches} branches, {loop.predicated_fmas} predicated "
                        "FMAs in the hot loop")  # fmt: skip
    if kind == "grouped" and loop.shared_loads_per_fma > 0.5:
        failures.append(f"{loop.shared_loads_per_fma:.2f} shared loads per FMA")
    if kind == "grouped" and loop.fma_fraction < 0.4:  # HMMAs count as FMA instructions
        failures.append(f"{100 * loop.fma_fraction:.0f}% FMAs in the hot loop")
    if cuda_static.mma_issue_bound(loop):  # an HMMA keeps its tensor core busy 4.3 clocks
        failures.append(f"{loop.instructions / loop.mma_instructions:.1f} instructions per "
                        f"MMA, > {cuda_static.tensor_clocks_per_mma():.1f} clocks")  # fmt: skip
    return failures


LAYERS = [pytest.param(layer, id=f"{layer.network}-{layer.name}") for layer in bench.layers()]
DTYPES = ["float32", "float16"]


@pytest.fixture(scope="module")
def reviews():
    """Every layer's review, from one nvcc run per dtype."""
    return bench.review_layers(DTYPES)


@needs_toolkit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", LAYERS)
def test_kernel_passes_the_static_gates(reviews, layer, dtype):
    review = reviews[layer, dtype]
    assert review.loop.fma_ops > 0, "no FMA found in the SASS"
    failures = gate_failures(review, layer.kind)
    assert not failures, f"{review.kernel.detail}: " + "; ".join(failures)


BAD_KERNEL = r"""
extern "C" __global__ void __launch_bounds__(48) bad_kernel(float* __restrict__ x,
                                                            float* __restrict__ y, int n) {
  __shared__ float tile[256];
  float spill[64];
  for (int i = 0; i < 64; ++i) spill[i] = x[(i * 7 + threadIdx.x) & 255];
  tile[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  float acc = 0.f;
  for (int k = 0; k < n; ++k) {
    if (k + threadIdx.x < n) acc += tile[k & 255] * tile[(k * 3) & 255];
  }
  y[threadIdx.x] = acc + spill[(int)acc & 63];
}
"""


@needs_toolkit
def test_the_gates_fail_a_bad_kernel():
    args = [KernelArg("x", "x", "float32", (256,), False, "input:x"),
            KernelArg("y", "y", "float32", (256, 1, 1, 1), True),
            KernelArg("w", "w", "float32", (256, 1, 1, 1), False, 0)]  # fmt: skip
    kernel = Kernel("bad", "bad_kernel", "test", "hand-written", BAD_KERNEL, (8, 1, 1),
                    (48, 1, 1), args)  # fmt: skip
    review = cuda_static.review(kernel, tools=TOOLS)
    failures = gate_failures(review, "grouped")
    assert review.loop.is_loop and review.loop.fma_ops > 0
    assert any("threads per block" in f for f in failures)
    assert any("blocks for" in f for f in failures)
    assert any("hot loop" in f for f in failures), failures
    assert any("shared loads per FMA" in f for f in failures), failures


TILE_SHAPES = [  # (in, out, groups, out_h, out_w, stride, dtype)
    (128, 128, 32, 56, 56, 1, "float32"), (1024, 1024, 32, 7, 7, 2, "float16"),
    (960, 960, 960, 7, 7, 1, "float32"), (32, 32, 32, 112, 112, 1, "float16"),
    (24, 48, 3, 13, 17, 1, "float32"), (64, 64, 2, 31, 1, 2, "float32"),
    (2048, 64, 2, 3, 3, 1, "float16"), (36, 36, 9, 5, 11, 1, "float32"),
]  # fmt: skip


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + s[6])
def test_tiles_divide_the_output_and_fit(shape):
    """Whatever the shape, the chosen tile covers the output exactly (no thread outside it,
    no guard) and fits the thread and shared-memory limits."""
    from gconv_compile.tvm_schedules import cuda_tiles
    from gconv_compile.tvm_schedules._conv import ConvInfo

    c_in, c_out, groups, out_h, out_w, stride, dtype = shape
    conv = ConvInfo(None, 1, c_in, c_out, c_in // groups, out_h, out_w, (3, 3), (stride,) * 2,
                    (1, 1), dtype, True, None, "w", True)  # fmt: skip
    tile = cuda_tiles.choose_tile(conv)
    kg = conv.out_per_group
    assert kg % tile.f_tile == 0 or tile.f_tile % kg == 0 and c_out % tile.f_tile == 0
    assert tile.f_tile % tile.f_t == 0 and out_h % tile.rows == 0
    assert out_w % tile.cols == 0 and tile.cols % tile.x_t == 0
    assert conv.in_per_group % tile.rc_i == 0 and conv.in_per_group % tile.k_split == 0
    assert tile.threads <= cuda_tiles.MAX_THREADS
    element = 2 if dtype == "float16" else 4
    assert sum(cuda_tiles._shared_bytes(conv, tile)) * element <= cuda_tiles.MAX_SHARED_BYTES
