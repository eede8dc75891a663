// Per-class certify on the GPU (full / diag / spherical): the batched Mahalanobis terms and
// the sound l2 radius of DESIGN 1.4, a warp per row.
//
// Per row z and class k: w_k = fl(z - mu_k), u-hat_k (full: one GEMM of a chunk of rows
// against the stacked [P_1; ...; P_K] (K*d x d) with -P_k mu_k as the bias, into the scratch
// U (chunk x K*d, bounded: never B x K x d); diag fl(p_k * w_k); spherical fl(s_k w_k)),
// D_k = fl(w_k^T u_k), f_k = kappa_k - D_k / 2 in float64, c = argmax f (lowest index on
// ties). Pass 1 over k finds c and keeps its terms; pass 2 recomputes the terms of every j
// with ||fl(u_c - u_j)||^2 and folds r_j = 2q / (g + sqrt(g^2 + 2 lam q)) into the min.
//
// Soundness: the error terms of gmfast.ops._reference.perclass_certify, same formulas, with
// the constants of gmfast._fp.perclass_constants (gamma = gamma_{d+4}(u_T), S = 1 + 4 gamma,
// the underflow terms nu, tiny_u, tiny_d; csrc/constants.h), lam+ from the table. D and the
// squared norms are accumulated in T, which is what that bound is written for (computed
// norms within gamma_{d+1}(u_T) of the exact ones, covered by S); an overflow gives inf and radius 0, a NaN gives 0. u-hat and its
// differences use explicitly rounded operations, so the u-hat_c of pass 2 is the rounded
// vector the bound is about. Everything after the accumulations is float64.
#include <algorithm>
#include <cmath>

#include "cuda/device.h"

namespace gmfast {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per row

// u-hat_k[i] for a row (KIND: 0 full from U, 1 diag, 2 spherical).
template <class T, int KIND>
__device__ __forceinline__ T u_hat(const T* urow, const T* prec, index_t k, index_t d, index_t i, T w) {
  if constexpr (KIND == 0) {
    return urow[k * d + i];
  } else if constexpr (KIND == 1) {
    return mul_rn(prec[k * d + i], w);
  } else {
    return mul_rn(prec[k], w);
  }
}

__device__ __forceinline__ double pair_radius(double q, double g, double lam) {
  if (!(q > 0.0)) return 0.0;
  const double den = g + sqrt(g * g + 2.0 * lam * q);
  if (den > 0.0) return 2.0 * q / den;
  return den == 0.0 ? infinity<double>() : 0.0;  // NaN: no certificate
}

template <class T, int KIND>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
    perclass_kernel(index_t R, index_t d, index_t K, const T* __restrict__ Z, index_t ldz, const T* __restrict__ U,
                    const T* __restrict__ mu, const T* __restrict__ prec, const double* __restrict__ kappa,
                    const double* __restrict__ pabs, const double* __restrict__ mun, const double* __restrict__ lam,
                    PerClassConsts cst, bool fp_sound, int64_t* __restrict__ pred, double* __restrict__ radius) {
  const int lane = threadIdx.x % kWarp;
  const index_t row = static_cast<index_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= R) return;  // uniform per warp
  const T* z = Z + row * ldz;
  const T* urow = KIND == 0 ? U + row * K * d : nullptr;

  // Pass 1: f_k for every class, the argmax and the winner's terms.
  double best = -infinity<double>(), Dc = 0.0, uuc = 0.0, wwc = 0.0;
  index_t c = 0;
  bool finite = true;
  for (index_t k = 0; k < K; ++k) {
    T D = T(0), uu = T(0), ww = T(0);
    for (index_t i = lane; i < d; i += kWarp) {
      const T w = sub_rn(z[i], mu[k * d + i]);
      const T u = u_hat<T, KIND>(urow, prec, k, d, i, w);
      D += w * u;
      uu += u * u;
      ww += w * w;
    }
    D = warp_sum(D);
    uu = warp_sum(uu);
    ww = warp_sum(ww);
    const double f = kappa[k] - 0.5 * static_cast<double>(D);
    finite = finite && isfinite(f);
    if (f > best) {  // strict: the lowest index wins ties
      best = f;
      c = k;
      Dc = D;
      uuc = uu;
      wwc = ww;
    }
  }
  if (!finite) {
    if (lane == 0) {
      pred[row] = -1;
      if (lam != nullptr) radius[row] = 0.0;
    }
    return;
  }
  if (lam == nullptr) {
    if (lane == 0) pred[row] = c;
    return;
  }

  double zn = 0.0, delta_c = 0.0, e_c = 0.0, mag_c = 0.0;
  if (fp_sound) {
    T zss = T(0);
    for (index_t i = lane; i < d; i += kWarp) zss += z[i] * z[i];
    zn = norm_up(static_cast<double>(warp_sum(zss)), cst);
    const double zm = zn + mun[c];
    const double un = sqrt(uuc) + cst.nu, wn = sqrt(wwc) + cst.nu;
    delta_c = cst.g * pabs[c] * zm + cst.u * un + cst.tiny_u;
    const double epsw = cst.three_u * zm;
    e_c = cst.S * (cst.g * wn * un + epsw * un + (wn + epsw) * delta_c) + cst.tiny_d;
    mag_c = fabs(kappa[c]) + fabs(Dc);
  }

  // Pass 2: every j != c against c.
  const double* lrow = lam + c * K;
  double r = infinity<double>();
  for (index_t j = 0; j < K; ++j) {
    if (j == c) continue;
    T D = T(0), uu = T(0), ww = T(0), gg = T(0);
    for (index_t i = lane; i < d; i += kWarp) {
      const T w = sub_rn(z[i], mu[j * d + i]);
      const T u = u_hat<T, KIND>(urow, prec, j, d, i, w);
      const T uc = u_hat<T, KIND>(urow, prec, c, d, i, KIND == 0 ? T(0) : sub_rn(z[i], mu[c * d + i]));
      const T diff = sub_rn(uc, u);
      D += w * u;
      uu += u * u;
      ww += w * w;
      gg += diff * diff;
    }
    D = warp_sum(D);
    uu = warp_sum(uu);
    ww = warp_sum(ww);
    gg = warp_sum(gg);
    const double Dj = static_cast<double>(D);
    double q = best - (kappa[j] - 0.5 * Dj);
    double G = sqrt(static_cast<double>(gg));
    if (fp_sound) {
      const double zm = zn + mun[j];
      const double un = sqrt(static_cast<double>(uu)) + cst.nu, wn = sqrt(static_cast<double>(ww)) + cst.nu;
      const double delta_j = cst.g * pabs[j] * zm + cst.u * un + cst.tiny_u;
      const double epsw = cst.three_u * zm;
      const double e_j = cst.S * (cst.g * wn * un + epsw * un + (wn + epsw) * delta_j) + cst.tiny_d;
      const double mag_j = fabs(kappa[j]) + fabs(Dj);
      q = q - cst.half_S * (e_c + e_j) - cst.four_u64 * (mag_c + mag_j);
      G = cst.S * ((G + cst.nu) * cst.one_u + delta_c + delta_j);
    }
    r = fmin(r, pair_radius(q, G, lrow[j]));
  }
  if (fp_sound) r *= cst.down8;
  if (lane == 0) {
    pred[row] = c;
    radius[row] = isnan(r) ? 0.0 : r;
  }
}

template <class T, int KIND>
void launch_rows(index_t R, index_t d, index_t K, const T* Z, index_t ldz, const T* U, const T* mu, const T* prec,
                 const double* kappa, const double* pabs, const double* mun, const double* lam,
                 const PerClassConsts& cst, bool fp_sound, int64_t* pred, double* radius, cudaStream_t stream) {
  const index_t blocks = (R + kRowsPerBlock - 1) / kRowsPerBlock;
  const auto kernel = perclass_kernel<T, KIND>;
  GMFAST_LAUNCH(kernel, static_cast<unsigned>(blocks), kRowsPerBlock * kWarp, stream, R, d, K, Z, ldz, U, mu, prec,
                kappa, pabs, mun, lam, cst, fp_sound, pred, radius);
  check(cudaGetLastError(), KIND == 0 ? "perclass_kernel<full>" : KIND == 1 ? "perclass_kernel<diag>"
                                                                             : "perclass_kernel<spherical>");
}

}  // namespace

template <class T>
void perclass_certify(const T* Z, index_t B, index_t d, index_t ldz, PerClassKind kind, const T* mu, const T* prec,
                      const T* neg_prec_mu, const double* kappa, const double* prec_abs_up,
                      const double* mu_norm_up, index_t K, const double* lam, const PerClassConsts* fp,
                      int64_t* pred, double* radius, T* U, index_t chunk, bool own_gemm, cudaStream_t stream) {
  if (B == 0) return;
  chunk = std::min(chunk, kMaxChunkRows);
  const bool fp_sound = fp != nullptr && lam != nullptr;
  const PerClassConsts cst = fp_sound ? *fp : PerClassConsts{};
  switch (kind) {
    case PerClassKind::kFull:
      // u-hat of a chunk = Z_chunk [P_1; ...; P_K]^T + (-P mu): the same rounded fl(P_k z) - P_k mu_k
      // as the reference (negation is exact).
      for (index_t r0 = 0; r0 < B; r0 += chunk) {
        const index_t rows = std::min(chunk, B - r0);
        if (own_gemm) gemm_nt_bias<T>(rows, K * d, d, Z + r0 * ldz, ldz, prec, neg_prec_mu, U, nullptr, stream);
        launch_rows<T, 0>(rows, d, K, Z + r0 * ldz, ldz, U, mu, prec, kappa, prec_abs_up, mu_norm_up, lam, cst,
                          fp_sound, pred + r0, lam != nullptr ? radius + r0 : nullptr, stream);
      }
      break;
    case PerClassKind::kDiag:
      launch_rows<T, 1>(B, d, K, Z, ldz, nullptr, mu, prec, kappa, prec_abs_up, mu_norm_up, lam, cst, fp_sound, pred,
                        radius, stream);
      break;
    case PerClassKind::kSpherical:
      launch_rows<T, 2>(B, d, K, Z, ldz, nullptr, mu, prec, kappa, prec_abs_up, mu_norm_up, lam, cst, fp_sound, pred,
                        radius, stream);
      break;
  }
}

template void perclass_certify<float>(const float*, index_t, index_t, index_t, PerClassKind, const float*,
                                      const float*, const float*, const double*, const double*, const double*,
                                      index_t, const double*, const PerClassConsts*, int64_t*, double*, float*,
                                      index_t, bool, cudaStream_t);
template void perclass_certify<double>(const double*, index_t, index_t, index_t, PerClassKind, const double*,
                                       const double*, const double*, const double*, const double*, const double*,
                                       index_t, const double*, const PerClassConsts*, int64_t*, double*, double*,
                                       index_t, bool, cudaStream_t);

}  // namespace cuda
}  // namespace gmfast
