// CPU kernel contracts (see gmfast/ops/certify.py, gmfast/ops/_reference.py and docs/DESIGN.md for the math).
#pragma once

#include "common.h"
#include "constants.h"

namespace gmfast {

// OpenMP regions fork a team only above this much work (multiply-adds, or element
// operations for the light loops): ~50 us of one core. Below it the fork/join costs more
// than it saves, and on a loaded machine a team waits for a core that another process
// holds: B = 450, d = 32, K = 10 took 24 ms at 2 threads against 0.026 ms at 1 (load 5).
// The work split does not change the arithmetic of any row, so results are the same
// either way (tests/test_backends.py compares thread counts).
constexpr double kParallelMinWork = double(1 << 20);
inline bool worth_parallel(double work) { return work >= kParallelMinWork; }

// Tied (linear) classifier: logits l = Z A^T + beta, then per row the argmax c and, when
// `inv` is non-null, the radius min_{j != c} (m_cj - E_cj) * inv[c, j] with
// m_cj = l_c - l_j, inv[c, j] <= 1 / ||a_c - a_j||_q, and E_cj the rounding-error bound
// built from alpha, eps (both null: no error term, fp_sound=False). Rows with non-finite
// logits get pred -1, radius 0.
//   Z     (B x d), row stride ldz, inner stride 1
//   A     (K x d) contiguous;  beta (K)
//   inv   (K x K) float64 or null (predictions only);  alpha, eps (K) float64 or both null
//   pred  (B) int64;  radius (B) float64 (ignored when table is null)
template <class T>
void tied_certify(const T* Z, index_t B, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  const double* inv, const double* alpha, const double* eps, int64_t* pred, double* radius);

// Largest r with q - g r - lam r^2 / 2 >= 0, without cancellation: 2q / (g + sqrt(g^2 + 2 lam q));
// 0 when q <= 0 (or NaN), +inf when g = lam = 0 (gmfast.ops._reference.perclass_radius).
inline double pair_radius(double q, double g, double lam) {
  if (!(q > 0.0)) return 0.0;
  const double den = g + std::sqrt(g * g + 2.0 * lam * q);
  return den > 0.0 ? 2.0 * q / den : kInf;
}

// Per-class quadratic classifier f_k = kappa_k - 1/2 (z - mu_k)^T P_k (z - mu_k) with the
// sound l2 radius of DESIGN 1.4 (gmfast.ops._reference.perclass_certify has the derivation).
// Never materialises B x K x d: rows are processed in blocks whose scratch is bounded.
//   prec: diag (K x d), spherical (K) (full: full_certify_chol);  mu (K x d)
//   kappa, prec_abs_up, mu_norm_up (K) float64;  lam (K x K) float64 or null (predict only)
//   fp: the rounding-error constants (constants.h) or null (fp_sound=False)
template <class T>
void perclass_certify(const T* Z, index_t B, index_t d, index_t ldz, PerClassKind kind, const T* mu,
                      const T* prec, const double* kappa, const double* prec_abs_up,
                      const double* mu_norm_up, index_t K, const double* lam, const PerClassConsts* fp,
                      int64_t* pred, double* radius);

// Full covariances in the Cholesky form (csrc/cpu/fullchol.cpp; the math is
// gmfast.ops._reference._perclass_certify_cholesky). The margins come from R_k = chol(P_k)^T packed
// in row panels of chol_panel_rows<T>() rows: for class k and panel p (i0 = p * NR), a
// (d - i0) x NR block, t-major, entry [t][r] = R_k[i0 + r, i0 + t] (zero past row d); panels
// follow each other, classes too. rbias (K x ceil(d / NR) * NR) = R_k mu_k, zero-padded.
// rho >= || |R_k| ||_2, sigma >= ||R_k||_2, eps >= ||R_k^T R_k - P_k||_2 (float64, K each); the
// exact gradients P_k z - P_k mu_k use prec and prec_mu, their error bound prec_abs_up.
template <class T>
constexpr index_t chol_panel_rows() {
  return static_cast<index_t>(2 * 64 / sizeof(T));  // = panel_width<T>() of microkernel.h
}
template <class T>
void full_certify_chol(const T* Z, index_t B, index_t d, index_t ldz, const T* rpack, const T* rbias,
                       const double* kappa, const double* rho, const double* sigma, const double* eps, const T* prec,
                       const T* prec_mu, const double* prec_abs_up, const double* mu_norm_up, index_t K,
                       const double* lam, const PerClassConsts* fp, int64_t* pred, double* radius);

}  // namespace gmfast
