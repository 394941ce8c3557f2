// Stand-in for CUDA's mma.h: the nvcuda::wmma API (16x16x16, half inputs, float or half
// accumulators) for kernels that cuda_host.h runs on the CPU.
//
// A fragment is warp-collective on a GPU, its elements spread over the 32 lanes in an
// unspecified layout. Here every lane (fiber) holds the whole 16x16 tile: a load reads the whole
// tile, mma_sync computes the whole product, a store writes the whole tile (each lane the same
// values). Code that reads fragment elements directly (frag.x[i]) is not supported: the layout
// is unspecified, and TVM's WMMA intrinsics never do it. Products are exact and sums in float,
// as the tensor cores' float32-accumulate path does (the order of the additions differs).
//
// Misuse that a GPU punishes with wrong results or a fault is counted in
// cuda_host::wmma_misuse (the launcher returns it negated): a pointer not 256-bit aligned, an
// ldm that is not a multiple of 16 bytes. Fragments start as NaN, so one used before it was
// filled or loaded poisons the result.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda_host.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K>
struct fragment_shape;
template <int M, int N, int K>
struct fragment_shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K>
struct fragment_shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K>
struct fragment_shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = fragment_shape<Use, M, N, K>::rows;
  static constexpr int cols = fragment_shape<Use, M, N, K>::cols;
  using layout = Layout;
  T tile[rows * cols];  // row-major, the whole tile in every lane
  fragment() {
    for (int i = 0; i < rows * cols; ++i) tile[i] = T(std::numeric_limits<float>::quiet_NaN());
  }
};

template <typename T>
static inline void check_pointer(const T* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0)
    ++cuda_host::wmma_misuse;
}

template <typename T>
static inline void copy_in(T* tile, int rows, int cols, const T* ptr, unsigned ldm, bool col) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) tile[i * cols + j] = col ? ptr[j * ldm + i] : ptr[i * ldm + j];
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
static inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr,
                                    unsigned ldm) {
  check_pointer(ptr, ldm);
  copy_in(f.tile, f.rows, f.cols, ptr, ldm, std::is_same<Layout, col_major>::value);
}

template <int M, int N, int K, typename T>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* ptr,
                                    unsigned ldm, layout_t layout) {
  check_pointer(ptr, ldm);
  copy_in(f.tile, f.rows, f.cols, ptr, ldm, layout == mem_col_major);
}

template <int M, int N, int K, typename T>
static inline void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f,
                                     unsigned ldm, layout_t layout) {
  check_pointer(ptr, ldm);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      T& out = layout == mem_col_major ? ptr[j * ldm + i] : ptr[i * ldm + j];
      out = f.tile[i * N + j];
    }
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
static inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V value) {
  for (int i = 0; i < f.rows * f.cols; ++i) f.tile[i] = T(value);
}

template <int M, int N, int K, typename A, typename LA, typename LB, typename C>
static inline void mma_sync(fragment<accumulator, M, N, K, C>& d,
                            const fragment<matrix_a, M, N, K, A, LA>& a,
                            const fragment<matrix_b, M, N, K, A, LB>& b,
                            const fragment<accumulator, M, N, K, C>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = (float)c.tile[i * N + j];
      for (int k = 0; k < K; ++k) sum += (float)a.tile[i * K + k] * (float)b.tile[k * N + j];
      out[i * N + j] = sum;
    }
  for (int i = 0; i < M * N; ++i) d.tile[i] = C(out[i]);
}

}  // namespace wmma
}  // namespace nvcuda
