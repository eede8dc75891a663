// Device helpers shared by the gmfast CUDA kernels: warp reductions, explicitly rounded
// arithmetic, and the norm bound read from the fp-sound constants (csrc/constants.h, derived
// in gmfast/_fp.py).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <limits>

#include "common.h"
#include "cuda/kernels.h"

namespace gmfast {
namespace cuda {

// Kernel launch. GMFAST_CUDA_EMULATE (tests only, tests/test_cuda.py) compiles these
// sources with a host C++ compiler and a stand-in cuda_runtime.h that runs every CUDA
// thread of a block as a host thread, so the kernels can be checked without a GPU.
// `kernel` is a pointer to a __global__ function (template arguments may contain commas).
#ifdef GMFAST_CUDA_EMULATE
#define GMFAST_LAUNCH(kernel, grid, block, stream, ...) \
  ::emu::launch((grid), (block), [&] { (void)(stream); kernel(__VA_ARGS__); })
#else
#define GMFAST_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// +infinity in device code (std::numeric_limits is host-only without relaxed constexpr).
template <class T>
__device__ __forceinline__ T infinity();
template <>
__device__ __forceinline__ float infinity<float>() {
  return __int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double infinity<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}

// Explicitly rounded product and difference: never contracted into an FMA, so a value
// that is stored or compared twice (u-hat of a class) is the same rounded number each time.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// Sum over the warp, then lane 0's value broadcast: every lane gets bit-identical results
// (an xor butterfly alone may round differently per lane), so control flow that depends
// on them stays uniform.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return __shfl_sync(kFullMask, v, 0);
}

// Exact (no rounding) reductions: every lane ends with the same value.
__device__ __forceinline__ double warp_min(double v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v = fmin(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// (max value, lowest index attaining it) over the warp.
template <class T>
__device__ __forceinline__ void warp_argmax(T& best, index_t& idx) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const T ob = __shfl_xor_sync(kFullMask, best, off);
    const index_t oi = __shfl_xor_sync(kFullMask, idx, off);
    if (ob > best || (ob == best && oi < idx)) {
      best = ob;
      idx = oi;
    }
  }
}

// Upper bound on ||z|| from ss = fl(sum z_i^2) accumulated in T: the norm_* fields of the
// constants (gmfast._fp.norm_constants), sqrt((ss + 2 d eta_T)(1 + gamma_{d+2}(u_T))) (1 + 4 u64).
template <class C>
__device__ __forceinline__ double norm_up(double ss, const C& c) {
  return sqrt((ss + c.norm_eta2) * c.norm_g1) * c.norm_up;
}

}  // namespace cuda
}  // namespace gmfast
