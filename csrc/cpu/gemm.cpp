// Row-major C = X * Y^T for the kernels' row blocks: MKL through a function pointer when
// one was installed (the MKL that torch already loaded), else a portable blocked loop.
// Compiled once per ISA (isa_table.h); the installed BLAS and the policy are shared state
// kept in dispatch.cpp.
#include <algorithm>
#include <climits>

#include "common.h"
#include "cpu/isa_table.h"
#include "cpu/microkernel.h"

namespace gmfast {

GemmPolicy gemm_policy() { return static_cast<GemmPolicy>(gmfast_state_policy()); }
bool have_blas() { return gmfast_state_sgemm() != nullptr && gmfast_state_dgemm() != nullptr; }

namespace {

// 4 x 4 register tile of dot products along k; `omp simd reduction` lets the compiler
// vectorise (reassociate) each reduction, which the callers' error bounds allow.
template <class T>
void tile_4x4(index_t k, const T* x0, const T* x1, const T* x2, const T* x3, const T* y0, const T* y1,
              const T* y2, const T* y3, T out[4][4]) {
  T a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
  T a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)
  for (index_t i = 0; i < k; ++i) {
    const T b0 = y0[i], b1 = y1[i], b2 = y2[i], b3 = y3[i];
    a00 += x0[i] * b0; a01 += x0[i] * b1; a02 += x0[i] * b2; a03 += x0[i] * b3;
    a10 += x1[i] * b0; a11 += x1[i] * b1; a12 += x1[i] * b2; a13 += x1[i] * b3;
    a20 += x2[i] * b0; a21 += x2[i] * b1; a22 += x2[i] * b2; a23 += x2[i] * b3;
    a30 += x3[i] * b0; a31 += x3[i] * b1; a32 += x3[i] * b2; a33 += x3[i] * b3;
  }
  out[0][0] = a00; out[0][1] = a01; out[0][2] = a02; out[0][3] = a03;
  out[1][0] = a10; out[1][1] = a11; out[1][2] = a12; out[1][3] = a13;
  out[2][0] = a20; out[2][1] = a21; out[2][2] = a22; out[2][3] = a23;
  out[3][0] = a30; out[3][1] = a31; out[3][2] = a32; out[3][3] = a33;
}

// The same tile that also accumulates ||x_i||^2 of its four rows (the tied epilogue's
// rounding-error bound needs ||z||: computing it here saves a second pass over Z).
template <class T>
void tile_4x4_norms(index_t k, const T* x0, const T* x1, const T* x2, const T* x3, const T* y0, const T* y1,
                    const T* y2, const T* y3, T out[4][4], T ss[4]) {
  T a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
  T a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33, s0, s1, s2, s3)
  for (index_t i = 0; i < k; ++i) {
    const T b0 = y0[i], b1 = y1[i], b2 = y2[i], b3 = y3[i];
    const T c0 = x0[i], c1 = x1[i], c2 = x2[i], c3 = x3[i];
    a00 += c0 * b0; a01 += c0 * b1; a02 += c0 * b2; a03 += c0 * b3;
    a10 += c1 * b0; a11 += c1 * b1; a12 += c1 * b2; a13 += c1 * b3;
    a20 += c2 * b0; a21 += c2 * b1; a22 += c2 * b2; a23 += c2 * b3;
    a30 += c3 * b0; a31 += c3 * b1; a32 += c3 * b2; a33 += c3 * b3;
    s0 += c0 * c0; s1 += c1 * c1; s2 += c2 * c2; s3 += c3 * c3;
  }
  out[0][0] = a00; out[0][1] = a01; out[0][2] = a02; out[0][3] = a03;
  out[1][0] = a10; out[1][1] = a11; out[1][2] = a12; out[1][3] = a13;
  out[2][0] = a20; out[2][1] = a21; out[2][2] = a22; out[2][3] = a23;
  out[3][0] = a30; out[3][1] = a31; out[3][2] = a32; out[3][3] = a33;
  ss[0] = s0; ss[1] = s1; ss[2] = s2; ss[3] = s3;
}

template <class T>
T dot(index_t k, const T* x, const T* y) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (index_t i = 0; i < k; ++i) acc += x[i] * y[i];
  return acc;
}

// Columns of C are processed in chunks whose rows of Y fit in L2 (~256 KiB), so a chunk
// of Y is reused by every row tile of X before the next chunk is loaded.
template <class T>
void portable_gemm_nt(index_t m, index_t n, index_t k, const T* X, index_t ldx, const T* Y, index_t ldy,
                      T* C, index_t ldc, T* ss) {
  const index_t nc = std::max<index_t>(4, ((256 * 1024) / static_cast<index_t>(sizeof(T) * std::max<index_t>(k, 1))) / 4 * 4);
  const index_t m4 = m - m % 4;
  T t[4][4];
  for (index_t c0 = 0; c0 < n; c0 += nc) {
    const index_t c1 = std::min(n, c0 + nc);
    const index_t c4 = c0 + (c1 - c0) / 4 * 4;
    for (index_t r = 0; r < m4; r += 4) {
      const T* x0 = X + r * ldx;
      for (index_t c = c0; c < c4; c += 4) {
        const T* y0 = Y + c * ldy;
        if (ss != nullptr && c == 0)
          tile_4x4_norms<T>(k, x0, x0 + ldx, x0 + 2 * ldx, x0 + 3 * ldx, y0, y0 + ldy, y0 + 2 * ldy, y0 + 3 * ldy, t,
                            ss + r);
        else
          tile_4x4<T>(k, x0, x0 + ldx, x0 + 2 * ldx, x0 + 3 * ldx, y0, y0 + ldy, y0 + 2 * ldy, y0 + 3 * ldy, t);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) C[(r + i) * ldc + c + j] = t[i][j];
      }
      for (index_t c = c4; c < c1; ++c)
        for (int i = 0; i < 4; ++i) C[(r + i) * ldc + c] = dot<T>(k, X + (r + i) * ldx, Y + c * ldy);
    }
    for (index_t r = m4; r < m; ++r)
      for (index_t c = c0; c < c1; ++c) C[r * ldc + c] = dot<T>(k, X + r * ldx, Y + c * ldy);
  }
  if (ss != nullptr) {  // rows the norm-fused tile did not cover
    const index_t first = n >= 4 ? m4 : 0;
    for (index_t r = first; r < m; ++r) ss[r] = dot<T>(k, X + r * ldx, X + r * ldx);
  }
}

bool fits_int(index_t v) { return v >= 0 && v <= INT_MAX; }

}  // namespace

template <class T>
void gemm_nt(index_t m, index_t n, index_t k, const T* X, index_t ldx, const T* Y, index_t ldy, T* C,
             index_t ldc, bool prefer_blas, T* ss) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (index_t r = 0; r < m; ++r) std::fill(C + r * ldc, C + r * ldc + n, T(0));
    if (ss != nullptr) std::fill(ss, ss + m, T(0));
    return;
  }
  const GemmPolicy policy = gemm_policy();
  const bool want_blas =
      policy == GemmPolicy::kBlas || (policy == GemmPolicy::kAuto && (prefer_blas || (k < kPortableMinInner && n >= kBlasMinCols)));
  const bool ok = want_blas && fits_int(m) && fits_int(n) && fits_int(k) && fits_int(ldx) && fits_int(ldy) &&
                  fits_int(ldc);
  // Column-major view: C^T (n x m, ldc) = Y (n x k; stored as k x n, ldy)^T * X^T (k x m; ldx).
  if constexpr (std::is_same_v<T, float>) {
    GmfastSgemm f = gmfast_state_sgemm();
    if (f != nullptr && ok) {
      const int M = static_cast<int>(n), N = static_cast<int>(m), Kk = static_cast<int>(k);
      const int lda = static_cast<int>(ldy), ldb = static_cast<int>(ldx), ldcc = static_cast<int>(ldc);
      const float one = 1.0f, zero = 0.0f;
      f("T", "N", &M, &N, &Kk, &one, Y, &lda, X, &ldb, &zero, C, &ldcc);
      if (ss != nullptr)
        for (index_t r = 0; r < m; ++r) ss[r] = dot<T>(k, X + r * ldx, X + r * ldx);
      return;
    }
  } else {
    GmfastDgemm f = gmfast_state_dgemm();
    if (f != nullptr && ok) {
      const int M = static_cast<int>(n), N = static_cast<int>(m), Kk = static_cast<int>(k);
      const int lda = static_cast<int>(ldy), ldb = static_cast<int>(ldx), ldcc = static_cast<int>(ldc);
      const double one = 1.0, zero = 0.0;
      f("T", "N", &M, &N, &Kk, &one, Y, &lda, X, &ldb, &zero, C, &ldcc);
      if (ss != nullptr)
        for (index_t r = 0; r < m; ++r) ss[r] = dot<T>(k, X + r * ldx, X + r * ldx);
      return;
    }
  }
  portable_gemm_nt<T>(m, n, k, X, ldx, Y, ldy, C, ldc, ss);
}

template void gemm_nt<float>(index_t, index_t, index_t, const float*, index_t, const float*, index_t, float*,
                             index_t, bool, float*);
template void gemm_nt<double>(index_t, index_t, index_t, const double*, index_t, const double*, index_t,
                              double*, index_t, bool, double*);

}  // namespace gmfast
