// Tied certify: logits by row blocks (GEMM), then, while the block is in cache, the fused
// O(K) epilogue per row: argmax, margins to every class, the fp-sound correction and the
// min over all classes of margin / denominator. Nothing of size B x K is kept.
//
// Soundness (gmfast._reference.tied_certify has the full argument): the computed logit
// l^_k differs from the exact l_k = a_k^T z + beta_k by at most e_k = alpha_k ||z|| + eps_k
// (alpha_k = gamma_{d+2} ||a_k||, eps_k = gamma_{d+2} |beta_k|, Higham's inner-product bound,
// valid for any summation order). The margin to j is lowered by (e_c + e_j)(1 + 8u) +
// 2u|m^| (the float64 operations here) and divided by table[c, j] >= ||a_c - a_j||_q; the
// quotient is deflated by (1 - 8u). Exactly the formula of gmfast._reference.tied_epilogue.
#include <algorithm>
#include <vector>

#include <omp.h>

#include "cpu/kernels.h"

namespace gmfast {
namespace {

template <class T>
void row_epilogue(const T* logits, index_t K, const T* z, index_t d, const double* table, const double* alpha,
                  const double* eps, int64_t* pred, double* radius) {
  index_t c = 0;
  T best = logits[0];
  bool finite = std::isfinite(static_cast<double>(best));
  for (index_t k = 1; k < K; ++k) {
    const T v = logits[k];
    finite = finite && std::isfinite(static_cast<double>(v));
    if (v > best) {  // strict: the lowest index wins ties, as torch.argmax
      best = v;
      c = k;
    }
  }
  if (!finite) {
    *pred = -1;
    if (table != nullptr) *radius = 0.0;
    return;
  }
  *pred = c;
  if (table == nullptr) return;
  const double lc = static_cast<double>(logits[c]);
  const double* row = table + c * K;
  double r = kInf;
  if (alpha != nullptr) {
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (index_t i = 0; i < d; ++i) ss += static_cast<double>(z[i]) * static_cast<double>(z[i]);
    const double zn = norm_up_from_ss(ss, d);
    const double ec = alpha[c] * zn + eps[c];
    const double up = slack_up(4);
    for (index_t j = 0; j < K; ++j) {
      if (j == c) continue;
      const double m = lc - static_cast<double>(logits[j]);
      const double num = m - ((ec + alpha[j] * zn + eps[j]) * up + 2.0 * kU64 * std::fabs(m));
      if (!(num > 0.0)) {
        r = 0.0;
        break;
      }
      r = std::min(r, num / row[j]);
    }
    r *= slack_down(4);
  } else {
    for (index_t j = 0; j < K; ++j) {
      if (j == c) continue;
      const double m = lc - static_cast<double>(logits[j]);
      if (!(m > 0.0)) {
        r = 0.0;
        break;
      }
      r = std::min(r, m / row[j]);
    }
  }
  *radius = r;
}

template <class T>
void logits_block(const T* Zb, index_t rows, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  T* L) {
  gemm_nt<T>(rows, K, d, Zb, ldz, A, d, L, K);
  for (index_t r = 0; r < rows; ++r) {
    T* l = L + r * K;
#pragma omp simd
    for (index_t k = 0; k < K; ++k) l[k] += beta[k];
  }
}

}  // namespace

template <class T>
void tied_certify(const T* Z, index_t B, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  const double* table, const double* alpha, const double* eps, int64_t* pred, double* radius) {
  if (B == 0) return;
  // Block rows so a block of logits stays in L2 (~256 KiB); the row partition does not
  // depend on the thread count, so results are identical for any number of threads.
  const index_t target = (256 * 1024) / static_cast<index_t>(sizeof(T) * std::max<index_t>(K, 1));
  const index_t mb = std::clamp<index_t>(target, 16, 1024);
  const index_t nblocks = (B + mb - 1) / mb;
  const bool small_params = static_cast<double>(K) * d * sizeof(T) <= 2.0 * 1024 * 1024;
  if (small_params || !have_blas()) {
    // A stays in cache: every thread runs whole blocks (a sequential GEMM each).
#pragma omp parallel
    {
      std::vector<T> L(static_cast<size_t>(mb * K));
#pragma omp for schedule(dynamic, 1)
      for (index_t b = 0; b < nblocks; ++b) {
        const index_t r0 = b * mb, rows = std::min(mb, B - r0);
        logits_block<T>(Z + r0 * ldz, rows, d, ldz, A, beta, K, L.data());
        for (index_t r = 0; r < rows; ++r)
          row_epilogue<T>(L.data() + r * K, K, Z + (r0 + r) * ldz, d, table, alpha, eps, pred + r0 + r,
                          radius + r0 + r);
      }
    }
  } else {
    // Large A: one multithreaded GEMM per block shares A's panels between threads, then
    // the epilogue runs in parallel over the block's rows.
    const index_t mbig = std::max<index_t>(mb, 256);
    std::vector<T> L(static_cast<size_t>(mbig * K));
    for (index_t r0 = 0; r0 < B; r0 += mbig) {
      const index_t rows = std::min(mbig, B - r0);
      logits_block<T>(Z + r0 * ldz, rows, d, ldz, A, beta, K, L.data());
#pragma omp parallel for schedule(static)
      for (index_t r = 0; r < rows; ++r)
        row_epilogue<T>(L.data() + r * K, K, Z + (r0 + r) * ldz, d, table, alpha, eps, pred + r0 + r,
                        radius + r0 + r);
    }
  }
}

template void tied_certify<float>(const float*, index_t, index_t, index_t, const float*, const float*, index_t,
                                  const double*, const double*, const double*, int64_t*, double*);
template void tied_certify<double>(const double*, index_t, index_t, index_t, const double*, const double*,
                                   index_t, const double*, const double*, const double*, int64_t*, double*);

}  // namespace gmfast
