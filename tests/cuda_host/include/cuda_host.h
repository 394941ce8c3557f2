// cuda_host.h: run the CUDA C that TVM generates on a CPU, for correctness tests without a GPU.
//
// A kernel launch runs the grid's blocks one after another. The threads of a block are fibers
// (ucontext) on one OS thread: each runs until __syncthreads() or its end, then the next one
// runs; a barrier phase ends when every live thread has reached it. The order in which a phase
// runs the threads is forward or reverse (the launcher's `order`), so a missing barrier shows up
// as a read of shared memory that no thread has written yet (in one order or the other).
// Shared memory (every __shared__ array, placed in one linker section) and the output are filled
// with NaN bytes before use, so a read of unwritten data poisons the result.
//
// Supported: __global__/__device__/__host__, __launch_bounds__, __shared__ (static sizes),
// threadIdx/blockIdx/blockDim/gridDim, __syncthreads, the half type with float conversions and
// arithmetic rounded to half after each operation, vector types (float2/4, int2/4, uint2/4,
// half2, half4) and make_*, __ldg, min/max.
// The nvcuda::wmma API comes from mma.h (every lane holds the whole tile).
// Not supported (compile errors, listed in tests/test_cuda_on_cpu.py): warp shuffles and votes,
// atomics, inline PTX (mma, ldmatrix, cp.async), dynamic shared memory, textures.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Declarations get rewritten to `alignas(N) CUDA_HOST_SHARED type name[size];` by the harness
// (a standard attribute must come before `static`); a bare __shared__ works as it is.
#define CUDA_HOST_SHARED static __attribute__((section("cuda_shared")))
#define __shared__ CUDA_HOST_SHARED

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
typedef dim3 uint3;

static dim3 threadIdx, blockIdx, blockDim, gridDim;

// ------------------------------------------------------------------------------------ half

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) { _Float16 h = (_Float16)f; std::memcpy(&bits, &h, 2); }
  __half(double f) : __half((float)f) {}
  __half(int i) : __half((float)i) {}
  operator float() const { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
};
typedef __half half;

// Each operation rounds to half, as the GPU's half instructions do.
#define CUDA_HOST_HALF_OP(op)                                                                  \
  static inline __half operator op(__half a, __half b) { return __half((float)a op (float)b); } \
  static inline __half& operator op##=(__half& a, __half b) { return a = a op b; }
CUDA_HOST_HALF_OP(+)
CUDA_HOST_HALF_OP(-)
CUDA_HOST_HALF_OP(*)
CUDA_HOST_HALF_OP(/)
#undef CUDA_HOST_HALF_OP
static inline __half operator-(__half a) { return __half(-(float)a); }
#define CUDA_HOST_HALF_CMP(op) \
  static inline bool operator op(__half a, __half b) { return (float)a op (float)b; }
CUDA_HOST_HALF_CMP(<)
CUDA_HOST_HALF_CMP(>)
CUDA_HOST_HALF_CMP(<=)
CUDA_HOST_HALF_CMP(>=)
CUDA_HOST_HALF_CMP(==)
CUDA_HOST_HALF_CMP(!=)
#undef CUDA_HOST_HALF_CMP

static inline __half __float2half(float f) { return __half(f); }
static inline __half __float2half_rn(float f) { return __half(f); }
static inline float __half2float(__half h) { return (float)h; }
static inline bool __hgt(__half a, __half b) { return a > b; }
static inline bool __hlt(__half a, __half b) { return a < b; }
static inline bool __hge(__half a, __half b) { return a >= b; }
static inline bool __hle(__half a, __half b) { return a <= b; }
static inline __half __hadd(__half a, __half b) { return a + b; }
static inline __half __hmul(__half a, __half b) { return a * b; }
static inline __half __hfma(__half a, __half b, __half c) {
  return __half(std::fma((float)a, (float)b, (float)c));
}
static inline __half hexp(__half a) { return __half(std::exp((float)a)); }
static inline __half hsqrt(__half a) { return __half(std::sqrt((float)a)); }
static inline __half htanh(__half a) { return __half(std::tanh((float)a)); }

struct __align__(4) __half2 {
  __half x, y;
};
typedef __half2 half2;
static inline __half2 make_half2(__half x, __half y) { return {x, y}; }

// ------------------------------------------------------------------------------ vector types

#define CUDA_HOST_VEC2(T, name, align) \
  struct __align__(align) name { T x, y; }; \
  static inline name make_##name(T x, T y) { return {x, y}; }
#define CUDA_HOST_VEC4(T, name, align) \
  struct __align__(align) name { T x, y, z, w; }; \
  static inline name make_##name(T x, T y, T z, T w) { return {x, y, z, w}; }
CUDA_HOST_VEC2(float, float2, 8)
CUDA_HOST_VEC4(float, float4, 16)
CUDA_HOST_VEC2(int, int2, 8)
CUDA_HOST_VEC4(int, int4, 16)
CUDA_HOST_VEC2(unsigned, uint2, 8)
CUDA_HOST_VEC4(unsigned, uint4, 16)
#undef CUDA_HOST_VEC2
#undef CUDA_HOST_VEC4

template <typename T>
static inline T __ldg(const T* p) { return *p; }

// CUDA's overloads of min and max for the device.
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline float min(float a, float b) { return std::fmin(a, b); }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------------- block execution

extern "C" char __start_cuda_shared[] __attribute__((weak));
extern "C" char __stop_cuda_shared[] __attribute__((weak));

namespace cuda_host {

struct Fiber {
  ucontext_t context;
  dim3 index;
  bool done = false;
};

struct Block {
  ucontext_t scheduler;
  Fiber* fibers = nullptr;
  int current = 0;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  int barrier_with_exited = 0;  // blocks where a __syncthreads came after some thread exited
};

static Block block_state;
static int wmma_misuse = 0;  // counted by mma.h's WMMA stand-in

static void fiber_entry() {
  block_state.body(block_state.arg);
  block_state.fibers[block_state.current].done = true;  // uc_link returns to the scheduler
}

__attribute__((noinline)) static void syncthreads() {
  Fiber& self = block_state.fibers[block_state.current];
  swapcontext(&self.context, &block_state.scheduler);
}

// Runs one block; returns false when some of its threads reached a barrier after others of
// them had exited (undefined behaviour on a GPU).
static bool run_block(int threads, int order, char* stacks, size_t stack_size) {
  Block& b = block_state;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.done = false;
    f.index.x = t % blockDim.x;
    f.index.y = (t / blockDim.x) % blockDim.y;
    f.index.z = t / (blockDim.x * blockDim.y);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks + (size_t)t * stack_size;
    f.context.uc_stack.ss_size = stack_size;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  bool uniform = true;
  for (;;) {
    int finished = 0;
    for (int i = 0; i < threads; ++i) {
      int t = order == 0 ? i : threads - 1 - i;
      Fiber& f = b.fibers[t];
      if (f.done) continue;
      b.current = t;
      threadIdx = f.index;
      swapcontext(&b.scheduler, &f.context);
    }
    for (int t = 0; t < threads; ++t) finished += b.fibers[t].done;
    if (finished == threads) return uniform;
    if (finished != 0) uniform = false;
  }
}

}  // namespace cuda_host

#define __syncthreads() cuda_host::syncthreads()

// Launch `body(arg)` (a call of the kernel) over the grid. order: 0 forward, 1 reverse.
// Returns 0, the number of blocks whose threads exited before a barrier others waited at, or
// minus the number of misused WMMA calls (mma.h).
static int cuda_host_launch(const int grid[3], const int block[3], int order,
                            void (*body)(void*), void* arg) {
  const size_t stack_size = 256 * 1024;
  gridDim.x = grid[0], gridDim.y = grid[1], gridDim.z = grid[2];
  blockDim.x = block[0], blockDim.y = block[1], blockDim.z = block[2];
  const int threads = block[0] * block[1] * block[2];
  cuda_host::Fiber* fibers = new cuda_host::Fiber[threads];
  char* stacks = static_cast<char*>(std::malloc(stack_size * threads));
  cuda_host::block_state.fibers = fibers;
  cuda_host::block_state.body = body;
  cuda_host::block_state.arg = arg;
  cuda_host::block_state.barrier_with_exited = 0;
  cuda_host::wmma_misuse = 0;
  for (int z = 0; z < grid[2]; ++z)
    for (int y = 0; y < grid[1]; ++y)
      for (int x = 0; x < grid[0]; ++x) {
        blockIdx.x = x, blockIdx.y = y, blockIdx.z = z;
        if (__start_cuda_shared != nullptr)
          std::memset(__start_cuda_shared, 0xff, __stop_cuda_shared - __start_cuda_shared);
        if (!cuda_host::run_block(threads, order, stacks, stack_size))
          ++cuda_host::block_state.barrier_with_exited;
      }
  std::free(stacks);
  delete[] fibers;
  if (cuda_host::wmma_misuse != 0) return -cuda_host::wmma_misuse;
  return cuda_host::block_state.barrier_with_exited;
}
