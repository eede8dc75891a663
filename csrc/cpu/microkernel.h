// The register-blocked microkernel of the tied (tied.cpp) and full-covariance (fullchol.cpp)
// kernels, sized for the instruction set this translation unit is compiled for.
//
// The kernel sources are compiled once per ISA (CMakeLists.txt: GMFAST_ISA_AVX512, _AVX2, or
// neither: the portable path, SSE2 on x86-64, NEON on aarch64) and the one to run is chosen at
// run time (dispatch.cpp). Each gets the tile that fills its register file:
//
//   ISA       vector   registers  tile (rows of Z x vectors of B)   accumulators
//   AVX-512   64 B     32 zmm     12 x 2  (12 x 32 floats)          24 + 2 loads + 1 broadcast
//   AVX2+FMA  32 B     16 ymm      6 x 2  ( 6 x 16 floats)          12 + 2 loads + 1 broadcast
//   SSE2      16 B     16 xmm      6 x 2  ( 6 x  8 floats)          12 + 2 loads + 1 broadcast
//   NEON      16 B     32 q       12 x 2  (12 x  8 floats)          24 + 2 loads + 1 broadcast
//
// acc (kMR x TW) = Zstrip (kMR x len) * panel (len x TW), both packed t-major: the strip holds,
// for each t, the kMR values Z[row, t]; the panel, for each t, TW = tile_width<T>() consecutive
// values starting a row of `ldb` values (a panel may be wider than a tile: the Cholesky panels
// are 128 bytes wide on every ISA, kernels.h: chol_panel_rows). FMA contraction is fine for the
// rounding bounds: an inner product in any order, chunked or not, with or without fused
// multiply-adds, stays within gamma_len (Higham, Thm 3.4 and its FMA variant), so the bound
// does not depend on the ISA or the blocking.
#pragma once

#include <algorithm>
#include <cstring>

#include "common.h"

namespace gmfast {

#if defined(GMFAST_ISA_AVX512)
constexpr int kVecBytes = 64;
constexpr int kMR = 12;
#elif defined(GMFAST_ISA_AVX2)
constexpr int kVecBytes = 32;
constexpr int kMR = 6;
#elif defined(__aarch64__)
constexpr int kVecBytes = 16;
constexpr int kMR = 12;
#else
constexpr int kVecBytes = 16;
constexpr int kMR = 6;
#endif
constexpr int kNV = 2;  // vectors per tile row

// The GEMM policy `auto` of this path (common.h: GemmPolicy), from the crossover tables measured
// per path (benchmarks/RESULTS.md). The tied logits take MKL in large multithreaded blocks when
// kAutoBlas (the portable path: MKL's own code beats 128-bit vectors everywhere; for
// K <= kBlasLanesMaxClasses its epilogue then runs across rows), else the lanes kernel of tied.cpp
// (rows in vector lanes, the epilogue across rows) when K <= kLanesMaxClasses, else the
// microkernel when K >= kMicroMinClasses or d <= kMicroMaxShortRow, else the portable
// dot-product tiles of gemm.cpp (norm-fused, Z unpacked).
// Other GEMMs (gemm_nt) take the tiles when the inner dimension is >= kPortableMinInner or the
// output has fewer than kBlasMinCols columns (MKL's per-call cost dominates small outputs).
// AVX2's tiles are 16 classes wide (AVX-512's 32), so fewer classes are padding: its
// microkernel already wins at K = 48 (1.08x the floor vs 1.28x for the tiles, one thread).
#if defined(GMFAST_ISA_AVX512)
constexpr bool kAutoBlas = false;
constexpr index_t kMicroMinClasses = 64;
#elif defined(GMFAST_ISA_AVX2)
constexpr bool kAutoBlas = false;
constexpr index_t kMicroMinClasses = 48;
#else
constexpr bool kAutoBlas = true;
constexpr index_t kMicroMinClasses = 64;
#endif
constexpr index_t kMicroMaxShortRow = 64, kPortableMinInner = 256, kBlasMinCols = 64;
constexpr index_t kLanesMaxClasses = 128;
// On the MKL-block path the across-rows epilogue pays a transposition and a per-(row, class)
// table gather; the per-row one, with its screen from 64 classes on, is faster from about
// 32 classes (SSE2: 1.15x at K = 32, 1.25x at K = 100, equal at K = 20, one thread).
constexpr index_t kBlasLanesMaxClasses = 24;
// Where kAutoBlas, rows this short (d < kAutoBlasMinInner) still take the lanes kernel when
// K <= kLanesMaxClasses: MKL's per-call and the epilogue's per-row costs dominate there (SSE2
// lanes 1.69x the floor vs 1.97x in MKL blocks at (8192, 32, 10), one thread).
constexpr index_t kAutoBlasMinInner = 33;

typedef float vfloat __attribute__((vector_size(kVecBytes)));
typedef double vdouble __attribute__((vector_size(kVecBytes)));
template <class T> struct VecOf;
template <> struct VecOf<float> { using type = vfloat; };
template <> struct VecOf<double> { using type = vdouble; };

template <class T>
constexpr int lanes() {
  return static_cast<int>(kVecBytes / sizeof(T));
}
// Columns of a tile.
template <class T>
constexpr index_t tile_width() {
  return kNV * lanes<T>();
}
// Columns of a Cholesky panel: 128 bytes on every ISA (a multiple of every tile width), so
// the packed tables built in Python do not depend on the path that runs.
template <class T>
constexpr index_t panel_width() {
  return static_cast<index_t>(128 / sizeof(T));
}
static_assert(128 % (kNV * kVecBytes) == 0, "a Cholesky panel must hold whole tiles");

template <class V, class T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class T>
__attribute__((always_inline)) inline void tile_acc(const T* __restrict zp, const T* __restrict rp, index_t len,
                                                    index_t ldb, typename VecOf<T>::type (&c)[kMR][kNV]) {
  using V = typename VecOf<T>::type;
  constexpr int L = lanes<T>();
#pragma GCC unroll 12
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < kNV; ++v) c[r][v] = V{};
  for (index_t t = 0; t < len; ++t) {
    V b[kNV];
    for (int v = 0; v < kNV; ++v) b[v] = vload<V>(rp + v * L);
    rp += ldb;
#pragma GCC unroll 12
    for (int r = 0; r < kMR; ++r) {
      const T a = zp[r];
      for (int v = 0; v < kNV; ++v) c[r][v] += a * b[v];
    }
    zp += kMR;
  }
}

// fl(sum z_t^2) over n values in T, any order (the norm bounds allow it): four independent
// vector accumulators, so the sum is not bound by the latency of one chain of additions
// (one chain cost a quarter of a certify call at (65536, 512, 10) on SSE2).
template <class T>
inline T sum_squares(const T* __restrict z, index_t n) {
  using V = typename VecOf<T>::type;
  constexpr int L = lanes<T>();
  V acc[4] = {};
  index_t t = 0;
  for (; t + 4 * L <= n; t += 4 * L)
    for (int i = 0; i < 4; ++i) {
      const V v = vload<V>(z + t + i * L);
      acc[i] += v * v;
    }
  const V a = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  T s = 0;
  for (int l = 0; l < L; ++l) s += a[l];
  for (; t < n; ++t) s += z[t] * z[t];
  return s;
}

// Pack rows [0, rows) of Z (row stride ldz) into strips of kMR rows, t-major, zero rows past
// `rows`: dst holds ceil(rows / kMR) strips of kMR x d.
template <class T>
inline void pack_strips(const T* Z, index_t rows, index_t d, index_t ldz, T* dst) {
  const index_t strips = (rows + kMR - 1) / kMR;
  for (index_t s = 0; s < strips; ++s) {
    T* out = dst + s * kMR * d;
    const index_t live = std::min<index_t>(kMR, rows - s * kMR);
    if (live == kMR) {  // t-outer: the writes are sequential, the kMR rows read as streams
      const T* src = Z + s * kMR * ldz;
      for (index_t t = 0; t < d; ++t) {
#pragma GCC unroll 12
        for (int r = 0; r < kMR; ++r) out[t * kMR + r] = src[r * ldz + t];
      }
      continue;
    }
    for (index_t t = 0; t < d; ++t)
      for (int r = 0; r < kMR; ++r) out[t * kMR + r] = r < live ? Z[(s * kMR + r) * ldz + t] : T(0);
  }
}

}  // namespace gmfast
