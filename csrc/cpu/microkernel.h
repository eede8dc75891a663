// The register-blocked microkernel of the full-covariance CPU kernel (fullchol.cpp), kept in a
// header for reuse. (Tried for the tied kernel too: slower there than its unpacked 4x4 tiles,
// because packing Z costs as much as the GEMM when K is small; benchmarks/RESULTS.md.)
//
// acc (kMR x 2L) = Zstrip (kMR x len) * panel (len x 2L), both packed t-major: the strip holds,
// for each t, the kMR values Z[row, t]; the panel, for each t, 2L consecutive values (L = one
// 64-byte vector: 16 floats or 8 doubles). GCC vector extensions compile to AVX-512 under
// -march=native on this project's machines and to narrower vectors elsewhere. FMA contraction
// is fine for the rounding bounds (an inner product in any order and with fused
// multiply-adds stays within gamma_len).
#pragma once

#include <algorithm>
#include <cstring>

#include "common.h"

namespace gmfast {

typedef float vfloat __attribute__((vector_size(64)));
typedef double vdouble __attribute__((vector_size(64)));
template <class T> struct VecOf;
template <> struct VecOf<float> { using type = vfloat; };
template <> struct VecOf<double> { using type = vdouble; };

constexpr int kMR = 12;  // rows of Z per tile: 2 x 12 accumulators + 2 panel vectors fit 32 registers

template <class T>
constexpr int lanes() {
  return static_cast<int>(64 / sizeof(T));
}
// Columns of a tile (rows of the packed operand per panel).
template <class T>
constexpr index_t panel_width() {
  return 2 * lanes<T>();
}

template <class V, class T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class T>
__attribute__((always_inline)) inline void tile_acc(const T* __restrict zp, const T* __restrict rp, index_t len,
                                                    typename VecOf<T>::type (&c)[kMR][2]) {
  using V = typename VecOf<T>::type;
  constexpr int L = lanes<T>();
#pragma GCC unroll 12
  for (int r = 0; r < kMR; ++r) c[r][0] = c[r][1] = V{};
  for (index_t t = 0; t < len; ++t) {
    const V b0 = vload<V>(rp), b1 = vload<V>(rp + L);
    rp += 2 * L;
#pragma GCC unroll 12
    for (int r = 0; r < kMR; ++r) {
      const T a = zp[r];
      c[r][0] += a * b0;
      c[r][1] += a * b1;
    }
    zp += kMR;
  }
}

// Pack rows [0, rows) of Z (row stride ldz) into strips of kMR rows, t-major, zero rows past
// `rows`: dst holds ceil(rows / kMR) strips of kMR x d.
template <class T>
inline void pack_strips(const T* Z, index_t rows, index_t d, index_t ldz, T* dst) {
  const index_t strips = (rows + kMR - 1) / kMR;
  for (index_t s = 0; s < strips; ++s) {
    T* out = dst + s * kMR * d;
    const index_t live = std::min<index_t>(kMR, rows - s * kMR);
    if (live == kMR) {  // t-outer: the writes are sequential, the 12 rows read as streams
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
