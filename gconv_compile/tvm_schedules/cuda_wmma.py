"""The five WMMA tensor intrinsics the tensor-core conv schedule uses (float16 in, float32 out).

Adapted from TVM's ``tvm.s_tir.tensor_intrin.cuda`` (Apache-2.0), which registers ~100
intrinsics on import (13 s); these five cost a fraction of a second. Each is a (description,
implementation) pair for ``Schedule.tensorize``: the description is the 16x16(x16) loop nest the
scheduled block must match, the implementation calls ``nvcuda::wmma`` (TVM's CUDA code generator
writes ``tvm_load_matrix_sync`` & co. as the C++ WMMA API, which the CPU execution test can
emulate; inline ``mma.sync`` PTX it could not).

Fragments: ``matrix_a`` 16x16 row-major (output channels x reduction), ``matrix_b`` 16x16
row-major (reduction x output pixels), ``accumulator`` 16x16 float32.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

M = N = K = 16
LOAD_A = "gconv_wmma_load_a_f16"
LOAD_B = "gconv_wmma_load_b_f16"
FILL = "gconv_wmma_fill_f32"
SYNC = "gconv_wmma_sync_f16f16f32"
STORE = "gconv_wmma_store_f32_shared"
STORE_DYN = "gconv_wmma_store_f32_shared_dyn"


def _fragment_index(buffer, stride, rows, cols):
    """Which fragment of a fragment buffer a 16x16 region is (by its element offset)."""
    return (
        buffer.elem_offset // stride // rows * (stride // cols)
        + buffer.elem_offset % stride // cols
    )


def _copy_desc(dtype: str, source: str, target: str):
    """What a fragment load or store does: a 16x16 copy from ``source`` to ``target`` scope."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16, 16), dtype, align=64, offset_factor=16, scope=source)
        C = T.match_buffer(c, (16, 16), dtype, align=64, offset_factor=16, scope=target)
        with T.sblock("root"):
            T.reads(A[0:16, 0:16])
            T.writes(C[0:16, 0:16])
            for i, j in T.grid(16, 16):
                with T.sblock("copy"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = A[vi, vj]

    return desc


def _load(scope: str):
    desc = _copy_desc("float16", "shared", scope)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1 = T.int32()
        s0 = T.int32()
        d1 = T.int32()
        d0 = T.int32()
        A = T.match_buffer(a, (16, 16), "float16", align=64, offset_factor=16, scope="shared",
                           strides=[s1, s0])  # fmt: skip
        C = T.match_buffer(c, (16, 16), "float16", align=64, offset_factor=16, scope=scope,
                           strides=[d1, d0])  # fmt: skip
        with T.sblock("root"):
            T.reads(A[0:16, 0:16])
            T.writes(C[0:16, 0:16])
            T.evaluate(T.tvm_load_matrix_sync(C.data, 16, 16, 16, _fragment_index(C, d1, 16, 16),
                                              A.access_ptr("r", ptr_type="float16"), s1,
                                              "row_major", dtype="void"))  # fmt: skip

    return desc, impl


@T.prim_func(s_tir=True)
def _fill_desc(c: T.handle) -> None:
    C = T.match_buffer(c, (16, 16), "float32", align=64, offset_factor=16,
                       scope="wmma.accumulator")  # fmt: skip
    with T.sblock("root"):
        T.reads()
        T.writes(C[0:16, 0:16])
        for i, j in T.grid(16, 16):
            with T.sblock("init"):
                vi, vj = T.axis.remap("SS", [i, j])
                C[vi, vj] = T.float32(0)


@T.prim_func(s_tir=True)
def _fill_impl(c: T.handle) -> None:
    d1 = T.int32()
    d0 = T.int32()
    C = T.match_buffer(c, (16, 16), "float32", align=64, offset_factor=16,
                       scope="wmma.accumulator", strides=[d1, d0])  # fmt: skip
    with T.sblock("root"):
        T.reads()
        T.writes(C[0:16, 0:16])
        T.evaluate(T.tvm_fill_fragment(C.data, 16, 16, 16, _fragment_index(C, d1, 16, 16),
                                       T.float32(0), dtype="void"))  # fmt: skip


@T.prim_func(s_tir=True)
def _sync_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (16, 16), "float16", align=64, offset_factor=16, scope="wmma.matrix_a")
    B = T.match_buffer(b, (16, 16), "float16", align=64, offset_factor=16, scope="wmma.matrix_b")
    C = T.match_buffer(c, (16, 16), "float32", align=64, offset_factor=16,
                       scope="wmma.accumulator")  # fmt: skip
    with T.sblock("root"):
        T.reads(C[0:16, 0:16], A[0:16, 0:16], B[0:16, 0:16])
        T.writes(C[0:16, 0:16])
        for i, j, k in T.grid(16, 16, 16):
            with T.sblock(""):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                C[vi, vj] = C[vi, vj] + T.Cast("float32", A[vi, vk]) * T.Cast("float32", B[vk, vj])


@T.prim_func(s_tir=True)
def _sync_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    a1 = T.int32()
    a0 = T.int32()
    b1 = T.int32()
    b0 = T.int32()
    c1 = T.int32()
    c0 = T.int32()
    A = T.match_buffer(a, (16, 16), "float16", align=64, offset_factor=16, scope="wmma.matrix_a",
                       strides=[a1, a0])  # fmt: skip
    B = T.match_buffer(b, (16, 16), "float16", align=64, offset_factor=16, scope="wmma.matrix_b",
                       strides=[b1, b0])  # fmt: skip
    C = T.match_buffer(c, (16, 16), "float32", align=64, offset_factor=16,
                       scope="wmma.accumulator", strides=[c1, c0])  # fmt: skip
    with T.sblock("root"):
        T.reads(C[0:16, 0:16], A[0:16, 0:16], B[0:16, 0:16])
        T.writes(C[0:16, 0:16])
        T.evaluate(T.tvm_mma_sync(C.data, _fragment_index(C, c1, 16, 16),
                                  A.data, _fragment_index(A, a1, 16, 16),
                                  B.data, _fragment_index(B, b1, 16, 16),
                                  C.data, _fragment_index(C, c1, 16, 16), dtype="void"))  # fmt: skip


def _store(scope: str):
    desc = _copy_desc("float32", "wmma.accumulator", scope)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1 = T.int32()
        s0 = T.int32()
        d1 = T.int32()
        d0 = T.int32()
        A = T.match_buffer(a, (16, 16), "float32", align=64, offset_factor=16,
                           scope="wmma.accumulator", strides=[d1, d0])  # fmt: skip
        C = T.match_buffer(c, (16, 16), "float32", align=64, offset_factor=16, scope=scope,
                           strides=[s1, s0])  # fmt: skip
        with T.sblock("root"):
            T.reads(A[0:16, 0:16])
            T.writes(C[0:16, 0:16])
            T.evaluate(T.tvm_store_matrix_sync(A.data, 16, 16, 16, _fragment_index(A, d1, 16, 16),
                                               C.access_ptr("w", ptr_type="float32"), s1,
                                               "row_major", dtype="void"))  # fmt: skip

    return desc, impl


_REGISTERED = False


def register() -> None:
    """Register the five intrinsics with TVM (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    TensorIntrin.register(LOAD_A, *_load("wmma.matrix_a"), override=True)
    TensorIntrin.register(LOAD_B, *_load("wmma.matrix_b"), override=True)
    TensorIntrin.register(FILL, _fill_desc, _fill_impl, override=True)
    TensorIntrin.register(SYNC, _sync_desc, _sync_impl, override=True)
    TensorIntrin.register(STORE, *_store("shared"), override=True)
    TensorIntrin.register(STORE_DYN, *_store("shared.dyn"), override=True)
    _REGISTERED = True
