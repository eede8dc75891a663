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
//
// Two forms of the epilogue evaluate that formula with the same float64 operations per
// (row, class) (so the argument above covers both, whatever the ISA or vector width; FMA
// contraction only removes roundings the slack counts): row_epilogue (one row, vectorised
// over the classes: many classes) and lanes_epilogue (a block of rows, vectorised over the
// rows, one class at a time: few classes, where the per-row fixed cost of the other
// dominated). Both write `num > 0 ? num * inv : 0` as max(0, num * inv), the same value
// (num <= 0 gives a product <= 0, or NaN for 0 * inf, and max(0, .) returns 0 for both),
// and skip j = c; the min over classes is exact in any order. With many classes the per-row
// form evaluates only the chunks of classes that a float32 screen cannot rule out
// (screened_min, docs/DESIGN.md §1.5.5): the same values' min, so the same radius, bit for bit.
#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "cpu/isa_table.h"
#include "cpu/kernels.h"
#include "cpu/microkernel.h"

// The portable x86-64 build (SSE2, no AVX): GCC vectorises the float64 margin loops below but
// turns their max/min selects into compare-and-mask sequences (SSE2 has no blend; about 40 of
// the 95 instructions per two vectors of rows of the across-rows loop, measured: the epilogue
// was ~40% of a certify call at (8192, 32, 10)). There the loops are written with maxpd/minpd,
// which compute the same values as the std::max/std::min of the generic loops:
//   std::max(0.0, p) = (0 < p) ? p : 0       = maxpd(p, 0)  (p > 0 ? p : second; NaN -> 0)
//   std::max(v, s)   = (v < s) ? s : v       = maxpd(s, v)  (s > v ? s : v)
//   std::min(r, v)   = (v < r) ? v : r       = minpd(v, r)  (v < r ? v : r)
// (MAXPD/MINPD return their second operand when the comparison is false, NaN included), and
// every arithmetic operation is the generic loop's, in the same order (no FMA on SSE2): the
// same float64 values, bit for bit (tests/test_isa.py compares the paths on near-tie data).
#if defined(__SSE2__) && !defined(__AVX__) && !defined(GMFAST_ISA_AVX2) && !defined(GMFAST_ISA_AVX512)
#include <emmintrin.h>
#define GMFAST_SSE2_MARGINS 1
#endif

namespace gmfast {
namespace {

#if defined(GMFAST_SSE2_MARGINS)
// two logits (float or double) as two doubles
inline __m128d load2d(const float* p) {
  return _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m128d load2d(const double* p) { return _mm_loadu_pd(p); }
#endif

// The certified value of each pair (row, j): max(0, num_j * inv[c, j]) with
// num_j = m_j - ((e_c + alpha_j ||z|| + eps_j) up + 2u|m_j|), m_j = l_c - l_j in float64
// (without alpha: num_j = m_j), and its min over j in [j0, j1). A non-positive numerator gives
// 0 (a tie or an uncertain margin: not certified), written max(0, num * inv) so that GCC
// vectorises it on AVX2 and SSE2 too (it will not if-convert `num > 0 ? ... : 0` under
// -ftrapping-math): num <= 0 makes the product <= 0, or NaN for 0 * inf, and max(0, .) returns
// 0 for both; num > 0 with an infinite reciprocal gives +inf (that class can never win). Every
// caller evaluates the pairs through this one function (inlined: the same operations, so the
// same values, wherever it runs), and the min over classes is exact in any order.
template <class T>
struct PairMin {
  const T* l;
  double lc;
  const double *row, *alpha, *eps;
  double ec, zn;
  __attribute__((always_inline)) double operator()(index_t j0, index_t j1) const {
    double r = kInf;
    const T* __restrict lp = l;
    const double* __restrict rp = row;
#if defined(GMFAST_SSE2_MARGINS)
    // the loops below, two classes at a time with maxpd/minpd (same values: see the top)
    {
      const __m128d vlc = _mm_set1_pd(lc), zero = _mm_setzero_pd();
      __m128d vr = _mm_set1_pd(kInf);
      index_t j = j0;
      if (alpha != nullptr) {
        const __m128d vec = _mm_set1_pd(ec), vzn = _mm_set1_pd(zn), vup = _mm_set1_pd(slack_up(4)),
                      v2u = _mm_set1_pd(2.0 * kU64), sign = _mm_set1_pd(-0.0);
        for (; j + 2 <= j1; j += 2) {
          const __m128d m = _mm_sub_pd(vlc, load2d(lp + j));
          const __m128d e = _mm_mul_pd(_mm_add_pd(_mm_add_pd(vec, _mm_mul_pd(_mm_loadu_pd(alpha + j), vzn)),
                                                  _mm_loadu_pd(eps + j)),
                                       vup);
          const __m128d num = _mm_sub_pd(m, _mm_add_pd(e, _mm_mul_pd(v2u, _mm_andnot_pd(sign, m))));
          vr = _mm_min_pd(_mm_max_pd(_mm_mul_pd(num, _mm_loadu_pd(rp + j)), zero), vr);
        }
        const double up = slack_up(4);
        for (; j < j1; ++j) {
          const double m = lc - static_cast<double>(lp[j]);
          const double num = m - ((ec + alpha[j] * zn + eps[j]) * up + 2.0 * kU64 * std::fabs(m));
          r = std::min(r, std::max(0.0, num * rp[j]));
        }
      } else {
        for (; j + 2 <= j1; j += 2) {
          const __m128d m = _mm_sub_pd(vlc, load2d(lp + j));
          vr = _mm_min_pd(_mm_max_pd(_mm_mul_pd(m, _mm_loadu_pd(rp + j)), zero), vr);
        }
        for (; j < j1; ++j) r = std::min(r, std::max(0.0, (lc - static_cast<double>(lp[j])) * rp[j]));
      }
      return std::min(r, std::min(_mm_cvtsd_f64(vr), _mm_cvtsd_f64(_mm_unpackhi_pd(vr, vr))));
    }
#endif
    if (alpha != nullptr) {
      const double* __restrict ap = alpha;
      const double* __restrict ep = eps;
      const double up = slack_up(4);
#pragma omp simd reduction(min : r)
      for (index_t j = j0; j < j1; ++j) {
        const double m = lc - static_cast<double>(lp[j]);
        const double num = m - ((ec + ap[j] * zn + ep[j]) * up + 2.0 * kU64 * std::fabs(m));
        r = std::min(r, std::max(0.0, num * rp[j]));
      }
    } else {
#pragma omp simd reduction(min : r)
      for (index_t j = j0; j < j1; ++j) {
        const double m = lc - static_cast<double>(lp[j]);
        r = std::min(r, std::max(0.0, m * rp[j]));
      }
    }
    return r;
  }
};

// Screening of the many-class epilogue (float32 logits only; docs/DESIGN.md §1.5.5 has the
// argument). The classes are cut into chunks of kScreenChunk; a chunk whose largest logit is
// low enough cannot hold the minimum and is skipped, the others are evaluated exactly by
// PairMin, so the radius is bit for bit the one of the full loop (the min of the same values
// over a set that provably contains the minimiser). The test, for a chunk q with largest logit
// l_q and the running minimum H of the values evaluated so far:
//   x_q = fl32(fl32(min(fl32(l_c - l_q), FLT_MAX) - E32) * w_c) > H32  =>  skip q,
// with w_c <= min_{j != c} inv[c, j] (rounded down to float32), E32 >= (e_c + max_j alpha_j
// ||z|| + max_j eps_j) up, inflated by 2^-19 and rounded up to float32, H32 >= H (1 + 2^-19)
// rounded up to float32 and one float32 ulp more. Proof sketch: every float32 operation is
// monotone, so x_j >= x_q for every j of the chunk; if x_j > H32 > 0 then s_lo = fl32(s - E32)
// > 0, and (Higham's model for each float32 and float64 rounding, the error term E_j <= E32
// (1 - 2^-20) + 2u|m_j|(1 + u)^4) num_j >= s_lo (1 - 2^-22), so num_j inv[c, j] >= s_lo w_c
// (1 - 2^-22) > H32 (1 - 2^-22) >= H, hence fl64(num_j inv[c, j]) >= H: the pair cannot be
// below the minimum. Chunks are visited by decreasing largest logit, so the first chunk that
// fails the test ends the search (every later one has a larger x). The chunk of c itself is
// always evaluated (its largest logit is l_c).
constexpr index_t kScreenChunk = 32;
bool margin_screen() { return gmfast_state_screen() != 0; }
#if defined(GMFAST_SSE2_MARGINS)
// SSE2 (2 float64 lanes): the screen's fixed cost per row (the chunk maxima, the chunk search)
// pays only from about 200 classes (full certify, MKL blocks, one thread, screen on vs off:
// (16384, 128, K = 64) 5.84 vs 5.58 ms, K = 100 8.70 vs 8.31, K = 128 9.55 vs 9.40;
// (8192, 128, 200) equal; (8192, 128, 300) 9.61 vs 10.20; (4096, 128, 1000) 15.0 vs 17.5).
constexpr index_t kScreenMinClasses = 6 * kScreenChunk;
#else
constexpr index_t kScreenMinClasses = 2 * kScreenChunk;
#endif

struct ScreenCtx {
  bool on;
  const float* wmin;   // (K) w_c, float32 rounded down; null: no screen
  double amax, emax;   // max_j alpha_j, max_j eps_j (0 without the error model)
  float* chunk_max;    // per-thread scratch, ceil(K / kScreenChunk)
};

// The next float32 above f >= 0 (+inf stays +inf): for a nonnegative float the next one up is
// the one whose bit pattern, read as an integer, is one more (+0 -> the smallest subnormal,
// FLT_MAX -> +inf). The same value as std::nextafter(f, +inf), without its libm call, which
// the screen made once or twice per row (about 1% of a call at (16384, 128, 100) on SSE2).
inline float next_up(float f) {
  if (!(f < std::numeric_limits<float>::infinity())) return f;
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  ++b;
  std::memcpy(&f, &b, sizeof b);
  return f;
}
// float32 >= y (y >= 0), and <= y for the rounded-down variant
inline float f32_up(double y) {
  float f = static_cast<float>(y);
  if (static_cast<double>(f) < y) f = next_up(f);
  return f;
}
inline float f32_down(double y) {
  float f = static_cast<float>(y);
  if (static_cast<double>(f) > y) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

// max over the lanes: log2(L) steps, each a constant shuffle (lane l takes lane l ^ k) and a max
template <int k>
inline vfloat hmax_step(vfloat v) {
  typedef int32_t M __attribute__((vector_size(kVecBytes)));
  M m;
  for (int l = 0; l < lanes<float>(); ++l) m[l] = l ^ k;
  const vfloat w = __builtin_shuffle(v, m);
  return w > v ? w : v;
}
inline float hmax(vfloat v) {
  constexpr int L = lanes<float>();
  if constexpr (L >= 16) v = hmax_step<8>(v);
  if constexpr (L >= 8) v = hmax_step<4>(v);
  v = hmax_step<2>(v);
  v = hmax_step<1>(v);
  return v[0];
}

template <class T>
double screened_min(const PairMin<T>& pairs, const T* logits, index_t K, index_t c, const ScreenCtx& sc) {
  if constexpr (!std::is_same_v<T, float>) {
    (void)logits; (void)sc;
    return std::min(pairs(0, c), pairs(c + 1, K));
  } else {
    constexpr index_t C = kScreenChunk;
    using V = vfloat;
    constexpr int L = lanes<float>();
    static_assert(C % L == 0, "whole vectors per chunk");
    const index_t nq = (K + C - 1) / C, qc = c / C;
    // The table rows of the chunks evaluated are read at random places (the inv row of c is
    // 8 KiB at K = 1000 and rarely in L1/L2): ask for them before the work that precedes them.
    auto prefetch = [&](index_t q) {
      for (index_t j = q * C; j < std::min(K, q * C + C); j += 64 / static_cast<index_t>(sizeof(double))) {
        __builtin_prefetch(pairs.row + j);
        if (pairs.alpha != nullptr) {
          __builtin_prefetch(pairs.alpha + j);
          __builtin_prefetch(pairs.eps + j);
        }
      }
    };
    prefetch(qc);
    float* cmax = sc.chunk_max;
    for (index_t q = 0; q < nq; ++q) {
      const index_t j0 = q * C, j1 = std::min(K, j0 + C);
      float m = -std::numeric_limits<float>::infinity();
      if (j1 - j0 == C) {
        V v = vload<V>(logits + j0);
        for (index_t j = j0 + L; j < j1; j += L) {
          const V w = vload<V>(logits + j);
          v = w > v ? w : v;
        }
        m = hmax(v);
      } else {
        for (index_t j = j0; j < j1; ++j) m = logits[j] > m ? logits[j] : m;
      }
      cmax[q] = m;
    }
    cmax[qc] = -std::numeric_limits<float>::infinity();  // evaluated first, below
    auto next = [&]() {
      index_t q = -1;
      float best = -std::numeric_limits<float>::infinity();
      for (index_t i = 0; i < nq; ++i)
        if (cmax[i] > best) {
          best = cmax[i];
          q = i;
        }
      return q;
    };
    index_t q = next();
    if (q >= 0) prefetch(q);
    double H = std::min(pairs(qc * C, c), pairs(c + 1, std::min(K, qc * C + C)));
    const double ybar = (pairs.ec + sc.amax * pairs.zn + sc.emax) * slack_up(4);
    const float e32 = f32_up((ybar * (1.0 + 0x1p-40) + 0x1p-1000) * (1.0 + 0x1p-19));
    const float w = sc.wmin[c], lc = logits[c];
    const float fmax = std::numeric_limits<float>::max();
    while (q >= 0 && H > 0.0) {
      const float h32 = next_up(f32_up(H * (1.0 + 0x1p-19)));  // H > 0
      const float s = std::min(lc - cmax[q], fmax);
      const float x = (s - e32) * w;
      if (x > h32) break;
      cmax[q] = -std::numeric_limits<float>::infinity();
      const index_t q1 = next();
      if (q1 >= 0) prefetch(q1);
      H = std::min(H, pairs(q * C, std::min(K, q * C + C)));
      q = q1;
    }
    return H;
  }
}

// The per-call part of the screen: w_c for every class (rounded down to float32; 0, which
// disables the screen for that class, if a row of the table holds a NaN or a negative entry)
// and the error model's maxima. Built only where the screen runs (float32 logits, K >=
// kScreenMinClasses, radii wanted) and pays: K^2 reads once per call, so only for batches of
// at least K / 2 rows (a single row with K = 1000 would pay ~0.3 ms for a ~1 us saving).
struct ScreenTables {
  std::vector<float> wmin;
  double amax = 0.0, emax = 0.0;
  index_t nq = 0;
  bool on = false;
  ScreenTables(bool is_float, index_t B, index_t K, const double* inv, const double* alpha, const double* eps) {
    on = is_float && inv != nullptr && K >= kScreenMinClasses && 2 * B >= K && margin_screen();
    if (!on) return;
    nq = (K + kScreenChunk - 1) / kScreenChunk;
    wmin.resize(K);
    if (alpha != nullptr)
      for (index_t k = 0; k < K; ++k) {
        amax = std::max(amax, alpha[k]);
        emax = std::max(emax, eps[k]);
      }
#pragma omp parallel for schedule(static) if (worth_parallel(double(K) * K))
    for (index_t c = 0; c < K; ++c) {
      const double* row = inv + c * K;
      double m = kInf;
      int bad = 0;
#pragma omp simd reduction(min : m) reduction(| : bad)
      for (index_t j = 0; j < K; ++j) {
        const double v = j == c ? kInf : row[j];
        bad |= !(v >= 0.0);
        m = std::min(m, v);
      }
      wmin[c] = bad ? 0.0f : f32_down(m);
    }
  }
  // the context of one thread (scratch: nq floats of its own)
  ScreenCtx ctx(std::vector<float>& scratch) const {
    scratch.resize(static_cast<size_t>(nq));
    return ScreenCtx{on, on ? wmin.data() : nullptr, amax, emax, scratch.data()};
  }
};

// ss: fl(||z||^2) accumulated in T by the GEMM (used only when alpha is non-null). beta
// non-null: the logits are still without it, and the first pass adds it in place (one pass
// over the row instead of two: the same fl(l + beta) values).
template <class T>
void row_epilogue(T* logits, const T* beta, index_t K, T ss, index_t d, const double* inv, const double* alpha,
                  const double* eps, int64_t* pred, double* radius, const ScreenCtx* screen = nullptr) {
  // argmax in one vectorised pass (a scalar pass here cost as much as a d = 128 GEMM): per
  // vector lane the running max and the index of its first occurrence (strict >), then across
  // lanes the max with the lowest index (lowest index wins ties, as torch.argmax; the lanes'
  // indices interleave, so the lowest index among the lanes that attain the max is the first
  // occurrence overall), then the tail. The index is carried as a T (exact: K < 2^24 is
  // checked at the binding) so every select is a plain vector blend on every ISA. Alongside,
  // whether any logit is NaN/Inf (x - x is 0 for finite x, NaN otherwise, and a sum of them
  // is NaN iff one is, in any order): such a row abstains, whatever the argmax says.
  using V = typename VecOf<T>::type;
  constexpr int L = lanes<T>();
  T best, bi, probe = 0;
  index_t k = 0;
  if (K >= 2 * L) {
    // Two independent (max, index) pairs, one for the even and one for the odd vectors of
    // the row: the select chain of one pair is latency-bound (compare, blend, on SSE2 three
    // mask operations), and with K = 1000 it was about a tenth of the MKL floor on the
    // portable path. Each lane of each pair holds the first occurrence of its max within its
    // own subsequence (strict >, increasing indices), so the lowest index among the lanes of
    // both pairs that attain the overall max is the first occurrence in the row.
    V vb[2], vi[2], vp[2], cur{};
    for (int l = 0; l < L; ++l) cur[l] = static_cast<T>(l);
    for (int s = 0; s < 2; ++s) {
      V v = vload<V>(logits + s * L);
      if (beta != nullptr) {
        v += vload<V>(beta + s * L);
        std::memcpy(logits + s * L, &v, sizeof(V));
      }
      vb[s] = v;
      vi[s] = cur + static_cast<T>(s * L);
      vp[s] = v - v;
    }
    cur += static_cast<T>(2 * L);
    auto step = [&](int s, index_t at, V idx) {
      V v = vload<V>(logits + at);
      if (beta != nullptr) {
        v += vload<V>(beta + at);
        std::memcpy(logits + at, &v, sizeof(V));
      }
      const auto gt = v > vb[s];
      vb[s] = gt ? v : vb[s];
      vi[s] = gt ? idx : vi[s];
      vp[s] += v - v;
    };
    for (k = 2 * L; k + 2 * L <= K; k += 2 * L) {
      step(0, k, cur);
      step(1, k + L, cur + static_cast<T>(L));
      cur += static_cast<T>(2 * L);
    }
    if (k + L <= K) {
      step(0, k, cur);
      k += L;
    }
    best = vb[0][0];
    bi = vi[0][0];
    for (int s = 0; s < 2; ++s)
      for (int l = 0; l < L; ++l)
        if (vb[s][l] > best || (vb[s][l] == best && vi[s][l] < bi)) {
          best = vb[s][l];
          bi = vi[s][l];
        }
    const V vps = vp[0] + vp[1];
    for (int l = 0; l < L; ++l) probe += vps[l];
  } else {
    if (beta != nullptr) logits[0] += beta[0];
    best = logits[0];
    bi = 0;
    probe = best - best;
    k = 1;
  }
  for (; k < K; ++k) {
    if (beta != nullptr) logits[k] += beta[k];
    const T v = logits[k];
    if (v > best) {
      best = v;
      bi = static_cast<T>(k);
    }
    probe += v - v;
  }
  const bool finite = probe == probe;
  if (!finite) {
    *pred = -1;
    if (inv != nullptr) *radius = 0.0;
    return;
  }
  const index_t c = static_cast<index_t>(bi);
  *pred = c;
  if (inv == nullptr) return;
  const double lc = static_cast<double>(logits[c]);
  const double* row = inv + c * K;
  const bool fp = alpha != nullptr;
  // ||z||^2 was accumulated in the working precision inside the GEMM; norm_up_from_ss<T>
  // carries the matching rounding bound.
  const double zn = fp ? norm_up_from_ss<T>(ss, d) : 0.0;
  const double ec = fp ? alpha[c] * zn + eps[c] : 0.0;
  const PairMin<T> pairs{logits, lc, row, alpha, eps, ec, zn};
  double r;
  if (screen != nullptr && screen->on)
    r = screened_min(pairs, logits, K, c, *screen);
  else
    r = std::min(pairs(0, c), pairs(c + 1, K));
  *radius = fp ? r * slack_down(4) : r;
}

// beta null: the logits without it (the caller adds it)
template <class T>
void logits_block(const T* Zb, index_t rows, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  T* L, T* ss, bool prefer_blas = false) {
  gemm_nt<T>(rows, K, d, Zb, ldz, A, d, L, K, prefer_blas, ss);
  if (beta == nullptr) return;
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
                        const double* inv, const double* alpha, const double* eps, int64_t* pred, double* radius,
                        const ScreenTables& screen) {
  using V = typename VecOf<T>::type;
  constexpr index_t NR = tile_width<T>();
  constexpr int L = lanes<T>();
  const index_t np = (K + NR - 1) / NR, Kp = np * NR;
  std::vector<T> apack(static_cast<size_t>(np) * d * NR);
#pragma omp parallel for schedule(static) if (worth_parallel(double(Kp) * d))
  for (index_t p = 0; p < np; ++p)
    for (index_t t = 0; t < d; ++t)
      for (index_t r = 0; r < NR; ++r) {
        const index_t k = p * NR + r;
        apack[(p * d + t) * NR + r] = k < K ? A[k * d + t] : T(0);
      }
  const index_t mb = kMicroRows, nblocks = (B + mb - 1) / mb;
#pragma omp parallel if (worth_parallel(double(B) * d * K))
  {
    std::vector<T> zp(static_cast<size_t>(mb) * kMicroKc), Lg(static_cast<size_t>(mb) * Kp), ss(mb);
    std::vector<float> chunks;
    const ScreenCtx sc = screen.ctx(chunks);
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
            ss[r] += sum_squares<T>(Z + (r0 + r) * ldz + t0, kc);
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
        row_epilogue<T>(l, beta, K, ss[r], d, inv, alpha, eps, pred + r0 + r, radius + r0 + r, &sc);
      }
    }
  }
}

// Few classes: rows in vector lanes. The roles of the microkernel's operands are swapped:
// A is packed once per call into strips of kMR classes (the broadcast side) and Z, per block,
// into panels of NR = tile_width<T>() rows, t-major (the vector side), so one tile holds kMR
// classes x NR rows and the classes are padded only to a multiple of kMR (12 or 6), not of
// NR (32 or 16): K = 10 wastes 17% of the multiply-adds instead of 69%. The logits land
// class-major (Lt[k][row]), and the whole epilogue (argmax, ||z||, margins, radius) then runs
// across rows, one vector of rows per class: no per-row horizontal reductions, which
// dominated the per-row epilogue at small K. The float64 arithmetic per (row, class) is the
// per-row epilogue's, operation for operation (only the order of the min differs, which is
// exact), so the rounding argument at the top of this file covers it unchanged.
constexpr index_t kLanesKc = 256;

// In-register transpose of a lanes<T>() x lanes<T>() tile: log2(L) stages, stage k exchanging
// the off-diagonal k x k blocks of every 2k x 2k block (two constant two-source shuffles per
// pair of vectors): L log2(L) shuffles instead of L^2 scalar moves.
template <class T>
struct Transpose {
  using V = typename VecOf<T>::type;
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I M __attribute__((vector_size(kVecBytes)));
  static constexpr int L = lanes<T>();

  template <int k>
  static inline void stage(V* r) {
    M lo, hi;
    for (int l = 0; l < L; ++l) {
      lo[l] = (l & k) ? L + l - k : l;  // row i: lanes with bit k set come from row i + k
      hi[l] = (l & k) ? L + l : l + k;  // row i + k: lanes with bit k clear come from row i
    }
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i)
      if (!(i & k)) {
        const V a = r[i], b = r[i + k];
        r[i] = __builtin_shuffle(a, b, lo);
        r[i + k] = __builtin_shuffle(a, b, hi);
      }
  }
  static inline void run(V* r) {
    if constexpr (L >= 16) stage<8>(r);
    if constexpr (L >= 8) stage<4>(r);
    if constexpr (L >= 4) stage<2>(r);
    if constexpr (L >= 2) stage<1>(r);
  }
};

// Z rows [0, rows) x columns [0, kc) (row stride ldz) into panels of NR rows, t-major:
// dst[(s * kc + t) * NR + i] = Z[s * NR + i, t], zero rows past `rows`.
template <class T>
inline void pack_panels(const T* Z, index_t rows, index_t kc, index_t ldz, T* dst) {
  using V = typename VecOf<T>::type;
  constexpr index_t NR = tile_width<T>();
  constexpr int L = lanes<T>();
  for (index_t s = 0; s * NR < rows; ++s) {
    T* out = dst + s * kc * NR;
    const index_t live = std::min<index_t>(NR, rows - s * NR);
    const T* src = Z + s * NR * ldz;
    // The strip's reads hop between NR rows: prefetch the next strip while transposing this
    // one (a profile of (65536, 128, 10) on AVX2 still puts these loads first; prefetching two
    // strips ahead measured the same).
    if ((s + 1) * NR < rows) {
      const index_t nlive = std::min<index_t>(NR, rows - (s + 1) * NR);
      for (index_t i = 0; i < nlive; ++i)
        for (index_t t = 0; t < kc; t += 64 / static_cast<index_t>(sizeof(T)))
          __builtin_prefetch(src + (NR + i) * ldz + t);
    }
    index_t t = 0;
    if (live == NR) {
      for (; t + L <= kc; t += L)
#pragma GCC unroll 2
        for (int v = 0; v < kNV; ++v) {
          V r[L];
#pragma GCC unroll 16
          for (int i = 0; i < L; ++i) r[i] = vload<V>(src + (v * L + i) * ldz + t);
          Transpose<T>::run(r);
#pragma GCC unroll 16
          for (int q = 0; q < L; ++q) std::memcpy(out + (t + q) * NR + v * L, &r[q], sizeof(V));
        }
    }
    for (; t < kc; ++t)
      for (index_t i = 0; i < NR; ++i) out[t * NR + i] = i < live ? src[i * ldz + t] : T(0);
  }
}

// The epilogue over a block of `rows` rows whose logits (with beta) are Lt[k * ld + r] and
// whose fl(||z||^2) are ss[r]. Every loop over r is a plain vector loop: table reads that
// depend on the row's class are gathered by a scalar loop first (a conditional or 64-bit
// indexed gather keeps GCC from vectorising the arithmetic on AVX2 and SSE2), and selects
// are written as max/min (under -ftrapping-math GCC will not if-convert `num > 0 ? ...`).
template <class T>
struct LanesScratch {
  std::vector<T> best, probe, ci;
  std::vector<int64_t> c, off;
  std::vector<double> cd, zn, ec, rad, iv;
  // n: a multiple of lanes<T>() (the argmax works on whole vectors of rows)
  explicit LanesScratch(index_t n) : best(n), probe(n), ci(n), c(n), off(n), cd(n), zn(n), ec(n), rad(n), iv(n) {}
};

template <class T>
void lanes_epilogue(const T* __restrict Lt, index_t ld, index_t rows, index_t K, const T* __restrict ss, index_t d,
                    const double* __restrict inv, const double* __restrict alpha, const double* __restrict eps,
                    int64_t* __restrict pred, double* __restrict radius, LanesScratch<T>& s) {
  T* __restrict best = s.best.data();
  T* __restrict probe = s.probe.data();
  T* __restrict ci = s.ci.data();
  int64_t* __restrict c = s.c.data();
  double* __restrict zn = s.zn.data();
  double* __restrict ec = s.ec.data();
  double* __restrict rad = s.rad.data();
  double* __restrict iv = s.iv.data();
  double* __restrict cd = s.cd.data();
  int64_t* __restrict off = s.off.data();
  // argmax as in row_epilogue, one vector of rows at a time: the running max, the index of its
  // first occurrence (strict >, classes in increasing order: the lowest index wins ties) as a
  // T, and the NaN/Inf probe. Whole vectors: the buffers hold a multiple of lanes<T>() rows
  // (rows past `rows` are padding, computed and ignored).
  {
    using V = typename VecOf<T>::type;
    constexpr int L = lanes<T>();
    for (index_t r = 0; r < rows; r += L) {
      V vb = vload<V>(Lt + r), vi{};
      V vp = vb - vb;
      for (index_t k = 1; k < K; ++k) {
        const V v = vload<V>(Lt + k * ld + r);
        const auto gt = v > vb;
        vb = gt ? v : vb;
        vi = gt ? V{} + static_cast<T>(k) : vi;
        vp += v - v;
      }
      std::memcpy(best + r, &vb, sizeof(V));
      std::memcpy(probe + r, &vp, sizeof(V));
      std::memcpy(ci + r, &vi, sizeof(V));
    }
    for (index_t r = 0; r < rows; ++r) {
      c[r] = static_cast<int64_t>(ci[r]);
      off[r] = c[r] * K;
      cd[r] = static_cast<double>(ci[r]);
    }
  }
  // non-finite rows keep c = 0 (a valid index for the table reads below) and are
  // overwritten at the end
  if (inv != nullptr) {
    for (index_t r = 0; r < rows; ++r) rad[r] = kInf;
    const bool fp = alpha != nullptr;
    const double up = slack_up(4);
    if (fp) {
      const NormUp<T> norm_up(d);
#pragma GCC ivdep
      for (index_t r = 0; r < rows; ++r) zn[r] = norm_up(ss[r]);
      for (index_t r = 0; r < rows; ++r) ec[r] = alpha[c[r]] * zn[r] + eps[c[r]];
    }
    for (index_t j = 0; j < K; ++j) {
      for (index_t r = 0; r < rows; ++r) iv[r] = inv[off[r] + j];
      const double jd = static_cast<double>(j);  // j = c is not a competitor: its value is +inf
      const T* l = Lt + j * ld;
#if defined(GMFAST_SSE2_MARGINS)
      // two rows at a time with maxpd/minpd (the same values as the loops below: see the top)
      {
        const __m128d vjd = _mm_set1_pd(jd), zero = _mm_setzero_pd(), inf = _mm_set1_pd(kInf);
        index_t r = 0;
        if (fp) {
          const __m128d vaj = _mm_set1_pd(alpha[j]), vej = _mm_set1_pd(eps[j]), vup = _mm_set1_pd(up),
                        v2u = _mm_set1_pd(2.0 * kU64), sign = _mm_set1_pd(-0.0);
          for (; r + 2 <= rows; r += 2) {
            const __m128d m = _mm_sub_pd(load2d(best + r), load2d(l + r));
            const __m128d e =
                _mm_mul_pd(_mm_add_pd(_mm_add_pd(_mm_loadu_pd(ec + r), _mm_mul_pd(vaj, _mm_loadu_pd(zn + r))), vej), vup);
            const __m128d num = _mm_sub_pd(m, _mm_add_pd(e, _mm_mul_pd(v2u, _mm_andnot_pd(sign, m))));
            const __m128d self = _mm_and_pd(_mm_cmpeq_pd(_mm_loadu_pd(cd + r), vjd), inf);
            const __m128d v = _mm_max_pd(self, _mm_max_pd(_mm_mul_pd(num, _mm_loadu_pd(iv + r)), zero));
            _mm_storeu_pd(rad + r, _mm_min_pd(v, _mm_loadu_pd(rad + r)));
          }
        } else {
          for (; r + 2 <= rows; r += 2) {
            const __m128d m = _mm_sub_pd(load2d(best + r), load2d(l + r));
            const __m128d self = _mm_and_pd(_mm_cmpeq_pd(_mm_loadu_pd(cd + r), vjd), inf);
            const __m128d v = _mm_max_pd(self, _mm_max_pd(_mm_mul_pd(m, _mm_loadu_pd(iv + r)), zero));
            _mm_storeu_pd(rad + r, _mm_min_pd(v, _mm_loadu_pd(rad + r)));
          }
        }
        for (; r < rows; ++r) {  // an odd row count: the last row as in the loops below
          const double m = static_cast<double>(best[r]) - static_cast<double>(l[r]);
          const double num = fp ? m - ((ec[r] + alpha[j] * zn[r] + eps[j]) * up + 2.0 * kU64 * std::fabs(m)) : m;
          const double v = std::max(std::max(0.0, num * iv[r]), cd[r] == jd ? kInf : 0.0);
          rad[r] = std::min(rad[r], v);
        }
        continue;
      }
#endif
      if (fp) {
        const double aj = alpha[j], ej = eps[j];
#pragma GCC ivdep
        for (index_t r = 0; r < rows; ++r) {
          const double m = static_cast<double>(best[r]) - static_cast<double>(l[r]);
          const double num = m - ((ec[r] + aj * zn[r] + ej) * up + 2.0 * kU64 * std::fabs(m));
          // num > 0 ? num * iv : 0 (num <= 0 gives a product <= 0 or NaN (0 * inf): 0)
          const double v = std::max(std::max(0.0, num * iv[r]), cd[r] == jd ? kInf : 0.0);
          rad[r] = std::min(rad[r], v);
        }
      } else {
#pragma GCC ivdep
        for (index_t r = 0; r < rows; ++r) {
          const double m = static_cast<double>(best[r]) - static_cast<double>(l[r]);
          const double v = std::max(std::max(0.0, m * iv[r]), cd[r] == jd ? kInf : 0.0);
          rad[r] = std::min(rad[r], v);
        }
      }
    }
    if (fp) {
      const double down = slack_down(4);
#pragma GCC ivdep
      for (index_t r = 0; r < rows; ++r) rad[r] *= down;
    }
  }
  for (index_t r = 0; r < rows; ++r) {
    const bool finite = probe[r] == probe[r];
    pred[r] = finite ? c[r] : -1;
    if (inv != nullptr) radius[r] = finite ? rad[r] : 0.0;
  }
}

template <class T>
void tied_certify_lanes(const T* Z, index_t B, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                        const double* inv, const double* alpha, const double* eps, int64_t* pred, double* radius) {
  using V = typename VecOf<T>::type;
  constexpr index_t NR = tile_width<T>();
  constexpr int L = lanes<T>();
  const index_t ng = (K + kMR - 1) / kMR;
  std::vector<T> apack(static_cast<size_t>(ng) * kMR * d);
  pack_strips<T>(A, K, d, d, apack.data());
  // rows per block: the class-major logits (ng * kMR x mb) and the packed Z chunk (mb x kc)
  // stay in L2; a multiple of NR, independent of the thread count
  const index_t mb = std::clamp<index_t>((16384 / (ng * kMR)) / NR * NR, NR, 256);
  const index_t nblocks = (B + mb - 1) / mb;
  // class rows of Lt padded by a cache line (a power-of-two stride thrashes a few L1 sets)
  const index_t ldt = mb + 64 / static_cast<index_t>(sizeof(T));
  const bool norms = alpha != nullptr;
#pragma omp parallel if (worth_parallel(double(B) * d * K))
  {
    const index_t kc_max = std::min(kLanesKc, d);
    std::vector<T> zp(static_cast<size_t>(mb) * std::max<index_t>(kc_max, 1)), Lt(static_cast<size_t>(ng) * kMR * ldt),
        ss(mb);
    LanesScratch<T> scratch(mb);
#pragma omp for schedule(dynamic, 1)
    for (index_t b = 0; b < nblocks; ++b) {
      const index_t r0 = b * mb, rows = std::min(mb, B - r0);
      const index_t np = (rows + NR - 1) / NR;
      std::fill(ss.begin(), ss.end(), T(0));
      if (d == 0) std::fill(Lt.begin(), Lt.end(), T(0));
      for (index_t t0 = 0; t0 < d; t0 += kLanesKc) {
        const index_t kc = std::min(kLanesKc, d - t0);
        pack_panels<T>(Z + r0 * ldz + t0, rows, kc, ldz, zp.data());
        for (index_t s = 0; s < np; ++s) {
          const T* zs = zp.data() + s * kc * NR;
          if (norms) {  // fl(||z||^2) in T, any order (norm_up_from_ss)
            V acc[kNV] = {};
            for (index_t t = 0; t < kc; ++t)
              for (int v = 0; v < kNV; ++v) {
                const V z = vload<V>(zs + t * NR + v * L);
                acc[v] += z * z;
              }
            for (int v = 0; v < kNV; ++v)
              for (int i = 0; i < L; ++i) ss[s * NR + v * L + i] += acc[v][i];
          }
          for (index_t g = 0; g < ng; ++g) {
            V acc[kMR][kNV];
            tile_acc<T>(apack.data() + (g * d + t0) * kMR, zs, kc, NR, acc);
#pragma GCC unroll 12
            for (int k = 0; k < kMR; ++k) {
              T* out = Lt.data() + (g * kMR + k) * ldt + s * NR;
              for (int v = 0; v < kNV; ++v) {
                if (t0 > 0) acc[k][v] += vload<V>(out + v * L);
                std::memcpy(out + v * L, &acc[k][v], sizeof(V));
              }
            }
          }
        }
      }
      for (index_t k = 0; k < K; ++k) {
        T* l = Lt.data() + k * ldt;
        const T bk = beta[k];
#pragma omp simd
        for (index_t r = 0; r < rows; ++r) l[r] += bk;
      }
      lanes_epilogue<T>(Lt.data(), ldt, rows, K, ss.data(), d, inv, alpha, eps, pred + r0, radius + r0, scratch);
    }
  }
}

// A 64-byte-aligned buffer of at least n values kept by the calling thread between calls
// (Slot tells the buffers of one call apart). The MKL-block path's logits and row copies (up
// to 32 + 8 MiB): fresh pages of that size, zeroed by the kernel on first touch, cost up to a
// sixth of a call (measured at (16384, 128, 100)) each time the allocator had given them back.
// Bounded like the buffers themselves; freed when the thread ends.
template <class T, int Slot>
T* reusable(size_t n) {
  struct Buf {
    T* p = nullptr;
    size_t n = 0;
    ~Buf() { ::operator delete[](p, std::align_val_t(64)); }
  };
  thread_local Buf b;
  if (b.n < n) {
    ::operator delete[](b.p, std::align_val_t(64));
    b.p = nullptr;
    b.n = 0;
    b.p = static_cast<T*>(::operator new[](sizeof(T) * n, std::align_val_t(64)));
    b.n = n;
  }
  return b.p;
}

}  // namespace

template <class T>
void tied_certify(const T* Z, index_t B, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  const double* inv, const double* alpha, const double* eps, int64_t* pred, double* radius) {
  if (B == 0) return;
  const GemmPolicy policy = gemm_policy();
  // Which GEMM (microkernel.h: the crossover of this ISA path). MKL is used only in large
  // multithreaded blocks: many small per-thread calls cost up to 8x the floor (measured).
  const bool blas_blocks =
      have_blas() && (policy == GemmPolicy::kBlas ||
                      (policy == GemmPolicy::kAuto && kAutoBlas && (d >= kAutoBlasMinInner || K > kLanesMaxClasses)));
  if (!blas_blocks && (policy == GemmPolicy::kLanes ||
                       (policy == GemmPolicy::kAuto && K <= kLanesMaxClasses))) {
    tied_certify_lanes<T>(Z, B, d, ldz, A, beta, K, inv, alpha, eps, pred, radius);
    return;
  }
  const ScreenTables screen(std::is_same_v<T, float>, B, K, inv, alpha, eps);
  if (!blas_blocks && (policy == GemmPolicy::kMicro ||
                       (policy == GemmPolicy::kAuto && (K >= kMicroMinClasses || d <= kMicroMaxShortRow)))) {
    tied_certify_micro<T>(Z, B, d, ldz, A, beta, K, inv, alpha, eps, pred, radius, screen);
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
#pragma omp parallel if (worth_parallel(double(B) * d * K))
    {
      std::vector<T> L(static_cast<size_t>(mb * K)), ss(static_cast<size_t>(mb));
      T* ssp = alpha != nullptr ? ss.data() : nullptr;
      std::vector<float> chunks;
      const ScreenCtx sc = screen.ctx(chunks);
#pragma omp for schedule(dynamic, 1)
      for (index_t b = 0; b < nblocks; ++b) {
        const index_t r0 = b * mb, rows = std::min(mb, B - r0);
        logits_block<T>(Z + r0 * ldz, rows, d, ldz, A, beta, K, L.data(), ssp);
        for (index_t r = 0; r < rows; ++r)
          row_epilogue<T>(L.data() + r * K, nullptr, K, ss[r], d, inv, alpha, eps, pred + r0 + r, radius + r0 + r,
                          &sc);
      }
    }
  } else {
    // One multithreaded GEMM per block shares A's packed panels between threads, then the
    // epilogue runs in parallel over the block's rows, with ||z||^2 summed there. Large
    // blocks (logits <= 32 MiB): MKL repacks A on every call (8 MiB at K = 1000, d = 2048), and
    // each block costs two fork/joins, which are slow on a shared machine; but Z's block is
    // small enough that the epilogue's second pass over it (the norms) reads the cache, not
    // memory (at (65536, 512, 10) a 32 MiB block made the norms cost a quarter of the call):
    // 1 MiB (L2) unless A is larger (then up to 8 MiB, L3: each call repacks A), which took
    // 10-25% off the MKL path at d = 128 (K = 10 to 1000) against 8 MiB blocks.
    const index_t s32 = (index_t{32} << 20) / static_cast<index_t>(sizeof(T));
    const index_t s8 = std::clamp<index_t>(K * d, (index_t{1} << 20) / static_cast<index_t>(sizeof(T)),
                                           (index_t{8} << 20) / static_cast<index_t>(sizeof(T)));
    // (a multiple of 64 rows: every block of a contiguous Z starts as aligned as Z itself)
    const index_t mbig =
        std::clamp<index_t>(std::min(s8 / std::max<index_t>(d, 1), s32 / K), 512, 16384) / 64 * 64;
    // not value-initialised: zeroing up to 32 MiB per call cost as much as the epilogue; and
    // kept by the thread between calls (reusable)
    T* const Lbuf = reusable<T, 0>(static_cast<size_t>(std::min(mbig, B) * K));
    // MKL's summation order depends on the leading dimension (and on alignment): rows with a
    // stride are copied into a contiguous, 64-byte-aligned block first, so that the results
    // are bit-identical to those of a contiguous (freshly allocated) Z, as on the other GEMMs.
    const bool gather = B > 1 && ldz != d;
    T* const zbuf = gather ? reusable<T, 1>(static_cast<size_t>(std::min(mbig, B) * d)) : nullptr;
    for (index_t r0 = 0; r0 < B; r0 += mbig) {
      const index_t rows = std::min(mbig, B - r0);
      const T* Zb = Z + r0 * ldz;
      index_t ldb = ldz;
      if (gather) {
#pragma omp parallel for schedule(static) if (worth_parallel(double(rows) * d))
        for (index_t r = 0; r < rows; ++r) std::memcpy(zbuf + r * d, Zb + r * ldz, sizeof(T) * d);
        Zb = zbuf;
        ldb = d;
      }
      // beta is added by the epilogues (in the same pass as their first read of the logits)
      logits_block<T>(Zb, rows, d, ldb, A, nullptr, K, Lbuf, nullptr, /*prefer_blas=*/true);
      if (K <= kBlasLanesMaxClasses) {
        // few classes: the per-row epilogue's fixed cost dominates; transpose the logits of
        // 256 rows at a time (K x 256, cheap next to the GEMM) and run the across-rows one
        // class rows of Lt padded by a cache line: a power-of-two stride would put the K
        // rows of a column in a few L1 sets
        constexpr index_t sub = 256, ldt = sub + 64 / static_cast<index_t>(sizeof(T));
        const index_t nsub = (rows + sub - 1) / sub;
#pragma omp parallel if (worth_parallel(double(rows) * (K + d) * 4))
        {
          std::vector<T> Lt(static_cast<size_t>(K * ldt)), ss(sub, T(0));
          LanesScratch<T> scratch(sub);
#pragma omp for schedule(static)
          for (index_t q = 0; q < nsub; ++q) {
            const index_t q0 = q * sub, n = std::min(sub, rows - q0);
            for (index_t r = 0; r < n; ++r) {
              const T* l = Lbuf + (q0 + r) * K;
              for (index_t k = 0; k < K; ++k) Lt[k * ldt + r] = l[k] + beta[k];
              if (alpha != nullptr) ss[r] = sum_squares<T>(Zb + (q0 + r) * ldb, d);
            }
            lanes_epilogue<T>(Lt.data(), ldt, n, K, ss.data(), d, inv, alpha, eps, pred + r0 + q0,
                              radius + r0 + q0, scratch);
          }
        }
        continue;
      }
#pragma omp parallel if (worth_parallel(double(rows) * (K + d) * 4))
      {
        std::vector<float> chunks;
        const ScreenCtx sc = screen.ctx(chunks);
#pragma omp for schedule(static)
        for (index_t r = 0; r < rows; ++r) {
          const T ss = alpha != nullptr ? sum_squares<T>(Zb + r * ldb, d) : T(0);
          row_epilogue<T>(Lbuf + r * K, beta, K, ss, d, inv, alpha, eps, pred + r0 + r, radius + r0 + r, &sc);
        }
      }
    }
  }
}

template void tied_certify<float>(const float*, index_t, index_t, index_t, const float*, const float*, index_t,
                                  const double*, const double*, const double*, int64_t*, double*);
template void tied_certify<double>(const double*, index_t, index_t, index_t, const double*, const double*,
                                   index_t, const double*, const double*, const double*, int64_t*, double*);

}  // namespace gmfast
