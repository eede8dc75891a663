// Tied certify: logits by row blocks (GEMM), then, while the block is in cache, the fused
// O(K) epilogue per row: argmax, margins to every class, the fp-sound correction and the
// min over all classes of margin / denominator. Nothing of size B x K is kept.
//
// Soundness (gmfast.ops._reference.tied_certify and docs/DESIGN.md §1.5.1 have the full argument): the computed logit
// l^_k differs from the exact l_k = a_k^T z + beta_k by at most e_k = alpha_k ||z|| + eps_k
// (alpha_k = gamma_{d+2} ||a_k||, eps_k = gamma_{d+2} |beta_k|, Higham's inner-product bound,
// valid for any summation order). The margin to j is lowered by (e_c + e_j)(1 + 8u) +
// 2u|m^| (the float64 operations here) and multiplied by inv[c, j] <= 1/||a_c - a_j||_q (a
// rounded-down reciprocal of the upper-bound table; +inf where the classes share a_k); the
// product is deflated by (1 - 8u). Exactly the formula of gmfast.ops._reference.tied_epilogue.
#include <algorithm>
#include <cstring>
#include <vector>

#include <omp.h>

#include "cpu/kernels.h"
#include "cpu/microkernel.h"

namespace gmfast {
namespace {

// ss: fl(||z||^2) accumulated in T by the GEMM (used only when alpha is non-null).
template <class T>
void row_epilogue(const T* logits, index_t K, T ss, index_t d, const double* inv, const double* alpha,
                  const double* eps, int64_t* pred, double* radius) {
  // argmax in two vectorised passes (a scalar pass here cost as much as a d = 128 GEMM): the
  // max and whether any logit is NaN/Inf (x - x is 0 for finite x, NaN otherwise, and a sum
  // of them is NaN iff one is, in any order), then the first index attaining the max (lowest
  // index wins ties, as torch.argmax) as a min-reduction.
  T best = logits[0], probe = 0;
#pragma omp simd reduction(max : best) reduction(+ : probe)
  for (index_t k = 0; k < K; ++k) {
    const T v = logits[k];
    best = v > best ? v : best;
    probe += v - v;
  }
  const bool finite = probe == probe;
  index_t c = K;
  if (finite) {
#pragma omp simd reduction(min : c)
    for (index_t k = 0; k < K; ++k) c = std::min(c, logits[k] == best ? k : K);
  }
  if (!finite) {
    *pred = -1;
    if (inv != nullptr) *radius = 0.0;
    return;
  }
  *pred = c;
  if (inv == nullptr) return;
  const double lc = static_cast<double>(logits[c]);
  const double* row = inv + c * K;
  double r = kInf;
  // Branch-free over j so the loop vectorises; j == c is masked to +inf. A non-positive
  // numerator gives 0 (a tie or an uncertain margin: not certified); num > 0 with an
  // infinite reciprocal gives +inf (that class can never win).
  if (alpha != nullptr) {
    // ||z||^2 was accumulated in the working precision inside the GEMM;
    // norm_up_from_ss<T> carries the matching rounding bound.
    const double zn = norm_up_from_ss<T>(ss, d);
    const double ec = alpha[c] * zn + eps[c];
    const double up = slack_up(4);
#pragma omp simd reduction(min : r)
    for (index_t j = 0; j < K; ++j) {
      const double m = lc - static_cast<double>(logits[j]);
      const double num = m - ((ec + alpha[j] * zn + eps[j]) * up + 2.0 * kU64 * std::fabs(m));
      double v = num > 0.0 ? num * row[j] : 0.0;
      v = (j == c) ? kInf : v;
      r = std::min(r, v);
    }
    r *= slack_down(4);
  } else {
#pragma omp simd reduction(min : r)
    for (index_t j = 0; j < K; ++j) {
      const double m = lc - static_cast<double>(logits[j]);
      double v = m > 0.0 ? m * row[j] : 0.0;
      v = (j == c) ? kInf : v;
      r = std::min(r, v);
    }
  }
  *radius = r;
}

template <class T>
void logits_block(const T* Zb, index_t rows, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  T* L, T* ss, bool prefer_blas = false) {
  gemm_nt<T>(rows, K, d, Zb, ldz, A, d, L, K, prefer_blas, ss);
  for (index_t r = 0; r < rows; ++r) {
    T* l = L + r * K;
#pragma omp simd
    for (index_t k = 0; k < K; ++k) l[k] += beta[k];
  }
}

// Many classes: A packed once per call into panels of NR = tile_width<T>() classes (t-major,
// zero past K); per block of kMicroRows rows and chunk of kMicroKc features, Z is packed into
// kMR-row strips and the register-blocked microkernel of microkernel.h (sized for the ISA of
// this build) accumulates the logit tiles into the block's buffer (the chunks only reorder
// each dot product's sum, which the bound allows); then + beta and the row epilogue while the
// block is in cache. ||z||^2 is summed in T while packing, as the norm-fused portable GEMM does.
// When it is used instead of the other GEMMs: kMicroMinClasses, kMicroMaxShortRow
// (microkernel.h, measured per ISA).
constexpr index_t kMicroRows = 192;  // a multiple of every kMR
constexpr index_t kMicroKc = 256;
static_assert(kMicroRows % kMR == 0, "whole strips per block");

template <class T>
void tied_certify_micro(const T* Z, index_t B, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                        const double* inv, const double* alpha, const double* eps, int64_t* pred, double* radius) {
  using V = typename VecOf<T>::type;
  constexpr index_t NR = tile_width<T>();
  constexpr int L = lanes<T>();
  const index_t np = (K + NR - 1) / NR, Kp = np * NR;
  std::vector<T> apack(static_cast<size_t>(np) * d * NR), bpad(Kp, T(0));
  std::copy(beta, beta + K, bpad.begin());
#pragma omp parallel for schedule(static)
  for (index_t p = 0; p < np; ++p)
    for (index_t t = 0; t < d; ++t)
      for (index_t r = 0; r < NR; ++r) {
        const index_t k = p * NR + r;
        apack[(p * d + t) * NR + r] = k < K ? A[k * d + t] : T(0);
      }
  const index_t mb = kMicroRows, nblocks = (B + mb - 1) / mb;
#pragma omp parallel
  {
    std::vector<T> zp(static_cast<size_t>(mb) * kMicroKc), Lg(static_cast<size_t>(mb) * Kp), ss(mb);
#pragma omp for schedule(dynamic, 1)
    for (index_t b = 0; b < nblocks; ++b) {
      const index_t r0 = b * mb, rows = std::min(mb, B - r0);
      const index_t ns = (rows + kMR - 1) / kMR;
      std::fill(ss.begin(), ss.end(), T(0));
      for (index_t t0 = 0; t0 < d; t0 += kMicroKc) {
        const index_t kc = std::min(kMicroKc, d - t0);
        pack_strips<T>(Z + r0 * ldz + t0, rows, kc, ldz, zp.data());
        if (alpha != nullptr)
          for (index_t r = 0; r < rows; ++r) {
            const T* z = Z + (r0 + r) * ldz + t0;
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (index_t t = 0; t < kc; ++t) acc += z[t] * z[t];
            ss[r] += acc;
          }
        for (index_t p = 0; p < np; ++p) {
          const T* ap = apack.data() + (p * d + t0) * NR;
          for (index_t s = 0; s < ns; ++s) {
            V c[kMR][kNV];
            tile_acc<T>(zp.data() + s * kMR * kc, ap, kc, NR, c);
            // every kMR row (Lg has room; rows past `rows` are ignored): a constant trip
            // count keeps the accumulators in registers
#pragma GCC unroll 12
            for (int r = 0; r < kMR; ++r) {
              T* out = Lg.data() + (s * kMR + r) * Kp + p * NR;
              for (int v = 0; v < kNV; ++v) {
                if (t0 > 0) c[r][v] += vload<V>(out + v * L);
                std::memcpy(out + v * L, &c[r][v], sizeof(V));
              }
            }
          }
        }
      }
      for (index_t r = 0; r < rows; ++r) {
        T* l = Lg.data() + r * Kp;
#pragma omp simd
        for (index_t k = 0; k < K; ++k) l[k] += bpad[k];
        row_epilogue<T>(l, K, ss[r], d, inv, alpha, eps, pred + r0 + r, radius + r0 + r);
      }
    }
  }
}

}  // namespace

template <class T>
void tied_certify(const T* Z, index_t B, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  const double* inv, const double* alpha, const double* eps, int64_t* pred, double* radius) {
  if (B == 0) return;
  const GemmPolicy policy = gemm_policy();
  // Which GEMM (microkernel.h: the crossover of this ISA path). MKL is used only in large
  // multithreaded blocks: many small per-thread calls cost up to 8x the floor (measured).
  const bool blas_blocks = have_blas() && (policy == GemmPolicy::kBlas || (policy == GemmPolicy::kAuto && kAutoBlas));
  if (!blas_blocks && (policy == GemmPolicy::kMicro ||
                       (policy == GemmPolicy::kAuto && (K >= kMicroMinClasses || d <= kMicroMaxShortRow)))) {
    tied_certify_micro<T>(Z, B, d, ldz, A, beta, K, inv, alpha, eps, pred, radius);
    return;
  }
  // Block rows so a block of logits (and of Z, reread by the epilogue) stays in L2; the row
  // partition does not depend on the thread count, so results are identical for any number
  // of threads.
  const index_t by_logits = (256 * 1024) / static_cast<index_t>(sizeof(T) * std::max<index_t>(K, 1));
  const index_t by_rows = (512 * 1024) / static_cast<index_t>(sizeof(T) * std::max<index_t>(d, 1));
  const index_t mb = std::clamp<index_t>(std::min(by_logits, by_rows), 16, 1024);
  const index_t nblocks = (B + mb - 1) / mb;
  // Otherwise whole blocks per thread with the portable, norm-fused GEMM.
  if (!blas_blocks) {
#pragma omp parallel
    {
      std::vector<T> L(static_cast<size_t>(mb * K)), ss(static_cast<size_t>(mb));
      T* ssp = alpha != nullptr ? ss.data() : nullptr;
#pragma omp for schedule(dynamic, 1)
      for (index_t b = 0; b < nblocks; ++b) {
        const index_t r0 = b * mb, rows = std::min(mb, B - r0);
        logits_block<T>(Z + r0 * ldz, rows, d, ldz, A, beta, K, L.data(), ssp);
        for (index_t r = 0; r < rows; ++r)
          row_epilogue<T>(L.data() + r * K, K, ss[r], d, inv, alpha, eps, pred + r0 + r, radius + r0 + r);
      }
    }
  } else {
    // One multithreaded GEMM per block shares A's packed panels between threads, then the
    // epilogue runs in parallel over the block's rows, with ||z||^2 summed there. Large
    // blocks (Z and logits <= 32 MiB each): MKL repacks A on every call (8 MiB at K = 1000,
    // d = 2048), and each block costs two fork/joins, which are slow on a shared machine.
    const index_t s32 = (index_t{32} << 20) / static_cast<index_t>(sizeof(T));
    const index_t mbig = std::clamp<index_t>(std::min(s32 / std::max<index_t>(d, 1), s32 / K), 512, 16384);
    std::vector<T> L(static_cast<size_t>(mbig * K));
    for (index_t r0 = 0; r0 < B; r0 += mbig) {
      const index_t rows = std::min(mbig, B - r0);
      logits_block<T>(Z + r0 * ldz, rows, d, ldz, A, beta, K, L.data(), nullptr, /*prefer_blas=*/true);
#pragma omp parallel for schedule(static)
      for (index_t r = 0; r < rows; ++r) {
        T ss = 0;
        if (alpha != nullptr) {
          const T* z = Z + (r0 + r) * ldz;
#pragma omp simd reduction(+ : ss)
          for (index_t t = 0; t < d; ++t) ss += z[t] * z[t];
        }
        row_epilogue<T>(L.data() + r * K, K, ss, d, inv, alpha, eps, pred + r0 + r, radius + r0 + r);
      }
    }
  }
}

template void tied_certify<float>(const float*, index_t, index_t, index_t, const float*, const float*, index_t,
                                  const double*, const double*, const double*, int64_t*, double*);
template void tied_certify<double>(const double*, index_t, index_t, index_t, const double*, const double*,
                                   index_t, const double*, const double*, const double*, int64_t*, double*);

}  // namespace gmfast
