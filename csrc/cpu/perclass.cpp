// Per-class certify for diagonal and spherical covariances (full ones: fullchol.cpp): the
// sound l2 radius of DESIGN 1.4, one row at a time; scratch is O(K d) per thread.
//
// For a row z and class k: w_k = z - mu_k, u_k = P_k w_k (elementwise), D_k = w_k^T u_k,
// f_k = kappa_k - D_k / 2, c = argmax f. For every j != c:
//   q = f_c - f_j,  g = ||u_c - u_j||,  lam = lam[c, j]  ->  r_j = 2q / (g + sqrt(g^2 + 2 lam q))
// and the radius is min_j r_j. With fp_sound, q is lowered and g raised by the rigorous
// rounding-error bounds derived in gmfast.ops._reference.perclass_certify (same formulas, the
// constants of gmfast._fp through constants.h): the radius is a lower bound on the exact one. D, norms and differences are
// accumulated in float64 here, which only tightens what the bounds (written for
// working-precision accumulation) cover.
#include <algorithm>
#include <vector>

#include <omp.h>

#include "cpu/kernels.h"

namespace gmfast {
namespace {

// Epilogue for one row, given u-hat for every class in U (K x d, working precision).
template <class T>
void row_epilogue(const T* z, index_t d, const T* mu, T* U, const double* kappa, const double* prec_abs_up,
                  const double* mu_norm_up, index_t K, const double* lam, const PerClassConsts* fp, double* f,
                  double* D, double* un, double* wn, int64_t* pred, double* radius) {
  bool finite = true;
  for (index_t k = 0; k < K; ++k) {
    const T* m = mu + k * d;
    const T* u = U + k * d;
    double dd = 0.0, uu = 0.0, ww = 0.0;
#pragma omp simd reduction(+ : dd, uu, ww)
    for (index_t i = 0; i < d; ++i) {
      const T w = z[i] - m[i];
      dd += static_cast<double>(w) * static_cast<double>(u[i]);
      uu += static_cast<double>(u[i]) * static_cast<double>(u[i]);
      ww += static_cast<double>(w) * static_cast<double>(w);
    }
    D[k] = dd;
    un[k] = std::sqrt(uu);
    wn[k] = std::sqrt(ww);
    f[k] = kappa[k] - 0.5 * dd;
    finite = finite && std::isfinite(f[k]);
  }
  if (!finite) {
    *pred = -1;
    if (lam != nullptr) *radius = 0.0;
    return;
  }
  index_t c = 0;
  for (index_t k = 1; k < K; ++k)
    if (f[k] > f[c]) c = k;
  *pred = c;
  if (lam == nullptr) return;

  // the constants of gmfast._fp.perclass_constants (fp null: fp_sound=False, none needed)
  const bool fp_sound = fp != nullptr;
  const PerClassConsts cst = fp_sound ? *fp : PerClassConsts{};
  const double u = cst.u, g_ = cst.g, S = cst.S, nu = cst.nu, tiny_u = cst.tiny_u, tiny_d = cst.tiny_d;
  double zn = 0.0;
  if (fp_sound) {
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (index_t i = 0; i < d; ++i) ss += static_cast<double>(z[i]) * static_cast<double>(z[i]);
    zn = norm_up_from_ss<double>(ss, d);
  }
  // Rounding-error terms of class k: Delta (on u_k) and e (on D_k).
  auto terms = [&](index_t k, double* delta, double* e) {
    const double zm = zn + mu_norm_up[k];
    const double unk = un[k] + nu, wnk = wn[k] + nu;
    *delta = g_ * prec_abs_up[k] * zm + u * unk + tiny_u;
    const double epsw = 3.0 * u * zm;
    *e = S * (g_ * wnk * unk + epsw * unk + (wnk + epsw) * (*delta)) + tiny_d;
  };
  double delta_c = 0.0, e_c = 0.0;
  if (fp_sound) terms(c, &delta_c, &e_c);
  const T* uc = U + c * d;
  const double* lrow = lam + c * K;
  double r = kInf;
  for (index_t j = 0; j < K; ++j) {
    if (j == c) continue;
    const T* uj = U + j * d;
    double gg = 0.0;
#pragma omp simd reduction(+ : gg)
    for (index_t i = 0; i < d; ++i) {
      const T diff = uc[i] - uj[i];
      gg += static_cast<double>(diff) * static_cast<double>(diff);
    }
    double g = std::sqrt(gg);
    double q = f[c] - f[j];
    if (fp_sound) {
      double delta_j, e_j;
      terms(j, &delta_j, &e_j);
      const double mag = std::fabs(kappa[c]) + std::fabs(D[c]) + std::fabs(kappa[j]) + std::fabs(D[j]);
      q = q - 0.5 * S * (e_c + e_j) - 4.0 * kU64 * mag;
      g = S * ((g + nu) * (1.0 + u) + delta_c + delta_j);
    }
    const double rj = pair_radius(q, g, lrow[j]);
    r = std::min(r, rj);
    if (r == 0.0) break;
  }
  if (fp_sound) r *= cst.down8;
  *radius = std::isnan(r) ? 0.0 : r;
}

// u-hat for the elementwise kinds: diag u = p (.) (z - mu), spherical u = s (z - mu).
template <class T>
void elementwise_u(const T* z, index_t d, PerClassKind kind, const T* mu, const T* prec, index_t K, T* U) {
  for (index_t k = 0; k < K; ++k) {
    const T* m = mu + k * d;
    T* u = U + k * d;
    if (kind == PerClassKind::kDiag) {
      const T* p = prec + k * d;
#pragma omp simd
      for (index_t i = 0; i < d; ++i) u[i] = p[i] * (z[i] - m[i]);
    } else {
      const T s = prec[k];
#pragma omp simd
      for (index_t i = 0; i < d; ++i) u[i] = s * (z[i] - m[i]);
    }
  }
}

}  // namespace

template <class T>
void perclass_certify(const T* Z, index_t B, index_t d, index_t ldz, PerClassKind kind, const T* mu,
                      const T* prec, const double* kappa, const double* prec_abs_up,
                      const double* mu_norm_up, index_t K, const double* lam, const PerClassConsts* fp,
                      int64_t* pred, double* radius) {
  if (B == 0) return;
  const size_t Kd = static_cast<size_t>(K) * d;
#pragma omp parallel if (worth_parallel(double(B) * Kd * 4))
  {
    std::vector<T> U(Kd);
    std::vector<double> f(K), D(K), un(K), wn(K);
#pragma omp for schedule(static)
    for (index_t r = 0; r < B; ++r) {
      const T* z = Z + r * ldz;
      elementwise_u<T>(z, d, kind, mu, prec, K, U.data());
      row_epilogue<T>(z, d, mu, U.data(), kappa, prec_abs_up, mu_norm_up, K, lam, fp, f.data(), D.data(),
                      un.data(), wn.data(), pred + r, radius + r);
    }
  }
}

template void perclass_certify<float>(const float*, index_t, index_t, index_t, PerClassKind, const float*,
                                      const float*, const double*, const double*, const double*,
                                      index_t, const double*, const PerClassConsts*, int64_t*, double*);
template void perclass_certify<double>(const double*, index_t, index_t, index_t, PerClassKind, const double*,
                                       const double*, const double*, const double*, const double*,
                                       index_t, const double*, const PerClassConsts*, int64_t*, double*);

}  // namespace gmfast
