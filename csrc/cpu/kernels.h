// CPU kernel contracts (see gmfast/ops/certify.py and gmfast/_reference.py for the math).
#pragma once

#include "common.h"

namespace gmfast {

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

enum class PerClassKind : int { kFull = 0, kDiag = 1, kSpherical = 2 };

// Per-class quadratic classifier f_k = kappa_k - 1/2 (z - mu_k)^T P_k (z - mu_k) with the
// sound l2 radius of DESIGN 1.4 (gmfast._reference.perclass_certify has the derivation).
// Never materialises B x K x d: rows are processed in blocks whose scratch is bounded.
//   prec: full (K x d x d), diag (K x d), spherical (K);  mu, prec_mu (K x d)
//   kappa, prec_abs_up, mu_norm_up (K) float64;  lam (K x K) float64 or null (predict only)
template <class T>
void perclass_certify(const T* Z, index_t B, index_t d, index_t ldz, PerClassKind kind, const T* mu,
                      const T* prec, const T* prec_mu, const double* kappa, const double* prec_abs_up,
                      const double* mu_norm_up, index_t K, const double* lam, bool fp_sound, int64_t* pred,
                      double* radius);

}  // namespace gmfast
