// Shared helpers for the gmfast CPU kernels: rounding-error constants and a row-major GEMM.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace gmfast {

using index_t = int64_t;

// Unit roundoff of float64; the O(K) epilogue runs in float64 (DESIGN 1.5).
constexpr double kU64 = 1.1102230246251565e-16;  // 2^-53

template <class T> constexpr double unit_roundoff();
template <> constexpr double unit_roundoff<float>() { return 5.9604644775390625e-08; }  // 2^-24
template <> constexpr double unit_roundoff<double>() { return kU64; }

// An upper bound on the absolute error a product may add on underflow (Higham eq. 2.8: half
// the smallest subnormal). For double, half of 2^-1074 is not representable (it rounds to
// 0), so the smallest subnormal itself is used.
template <class T> constexpr double underflow_unit();
template <> constexpr double underflow_unit<float>() { return 7.006492321624085e-46; }  // 2^-150
template <> constexpr double underflow_unit<double>() { return 4.9406564584124654e-324; }  // 2^-1074

// Higham's gamma_n = n u / (1 - n u); callers check n u < 1/2 on the Python side.
inline double gamma_n(index_t n, double u) {
  const double nu = static_cast<double>(n) * u;
  return nu / (1.0 - nu);
}
// 1 + 2k u64: lifts a float64 result of <= k roundings above the exact value.
inline double slack_up(int k) { return 1.0 + 2.0 * k * kU64; }
// 1 - 2k u64: pushes a float64 result of <= k roundings below the exact value.
inline double slack_down(int k) { return 1.0 - 2.0 * k * kU64; }

constexpr double kInf = std::numeric_limits<double>::infinity();

// Upper bound on sqrt(sum x_i^2) from ss = fl(sum x_i^2) accumulated in precision A over
// n terms (any order): each square adds at most eta_A absolutely, the sum is within
// gamma_{n+1}(u_A) relatively, so sum x^2 <= (ss + 2 n eta_A)(1 + gamma_{n+2}(u_A)); the
// float64 square root and products add <= 4 roundings. For A = double this is exactly
// gmfast._fp.norm_upper.
// NormUp<A>(n) hoists the per-call constants (the same operations, so the same values):
// the epilogues evaluate it once per row.
template <class A>
struct NormUp {
  double add, mul;
  explicit NormUp(index_t n)
      : add(2.0 * static_cast<double>(n) * underflow_unit<A>()), mul(1.0 + gamma_n(n + 2, unit_roundoff<A>())) {}
  double operator()(A ss) const { return std::sqrt((static_cast<double>(ss) + add) * mul) * (1.0 + 4.0 * kU64); }
};
template <class A>
inline double norm_up_from_ss(A ss, index_t n) {
  return NormUp<A>(n)(ss);
}

// Fortran BLAS gemm (column-major, LP64 integers), as exported by MKL inside libtorch.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*,
                          const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);

// Install (or clear, with nullptr) the BLAS used by gemm_nt; without one a portable
// register-blocked loop runs instead.
void set_blas(sgemm_fn s, dgemm_fn d);
bool have_blas();

// Which GEMM gemm_nt uses. kAuto: the portable blocked loop when the inner dimension is
// long (k >= 256: it keeps A panels in L2 and measured faster than MKL there on this
// project's reference machine, see benchmarks/RESULTS.md), MKL otherwise.
enum class GemmPolicy : int { kAuto = 0, kBlas = 1, kPortable = 2, kMicro = 3, kLanes = 4 };
void set_gemm_policy(GemmPolicy p);
GemmPolicy gemm_policy();

// Whether the many-class tied epilogue screens its classes in float32 before the float64 work
// (csrc/cpu/tied.cpp: screened_min; on by default). The radii are the same bits either way;
// off only for the tests that check exactly that, and for benchmarks.
void set_margin_screen(bool on);
bool margin_screen();

// C (m x n, row-major, leading dim ldc) = X (m x k, row-major, ldx) * Y^T, with Y (n x k,
// row-major, ldy); C is overwritten. Any summation order: the rounding-error bounds of the
// callers (gamma_{k+2}) hold for every order, with or without FMA.
// `prefer_blas` asks for BLAS under kAuto whatever k is (very wide, packed-friendly shapes).
// If `ss` is non-null it receives fl(||X_r||^2) per row, accumulated in T in any order
// (fused into the first column tile of the portable loop).
template <class T>
void gemm_nt(index_t m, index_t n, index_t k, const T* X, index_t ldx, const T* Y, index_t ldy, T* C,
             index_t ldc, bool prefer_blas = false, T* ss = nullptr);

}  // namespace gmfast
