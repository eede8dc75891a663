// Full-covariance certify in the Cholesky form (gmfast.ops._reference._perclass_certify_cholesky
// is the same computation without the pruning, and has the error analysis).
//
// Phase 1, the margins: D_k = ||R_k z - b_k||^2 for every row and class, R_k = chol(P_k)^T upper
// triangular, b_k = R_k mu_k. A register-blocked microkernel (MR rows x NR rows of R_k, GCC
// vector extensions sized for the ISA of this build, microkernel.h) runs over R_k's row
// panels (NR = 128 bytes on every ISA, in tiles of tile_width<T>() rows); the panel that
// starts at row i0 is zero left of column i0, so its inner loop is d - i0 long: about half
// the multiply-adds of P_k z. The square-and-reduce is fused: y never leaves the registers.
//
// Phase 2, the radius: for the predicted class c and every j, q_cj from D, and a cheap bound
// ||g_cj|| <= ub_c + ub_j (ub_k >= ||P_k (z - mu_k)||, from D_k and sigma_k >= ||R_k||_2) gives
// a sound lower bound rlb_j on the pair's radius. The exact gradients u_k = P_k z - P_k mu_k
// are computed (one GEMM per class over the gathered rows) for c and the two pairs with the
// smallest rlb, then for every other pair whose rlb is below the best exact radius so far;
// the rest cannot be the minimum. The result is the reference's min over all pairs.
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "cpu/kernels.h"
#include "cpu/microkernel.h"

namespace gmfast {
namespace {

constexpr int kMB = 96;  // rows per block (packed once, reused by every panel): whole strips of every kMR
static_assert(kMB % kMR == 0, "whole strips per block");

// One tile of y = R_k z over tile_width<T>() rows of a panel (row stride ldb), then the fused
// epilogue sq[r] += (y[r] - bias)^2 lane-wise.
template <class T>
inline void chol_tile(const T* __restrict zp, const T* __restrict rp, index_t len, index_t ldb, const T* bias,
                      typename VecOf<T>::type* __restrict sq) {
  using V = typename VecOf<T>::type;
  constexpr int L = lanes<T>();
  V c[kMR][kNV];
  tile_acc<T>(zp, rp, len, ldb, c);
  V m[kNV];
  for (int v = 0; v < kNV; ++v) m[v] = vload<V>(bias + v * L);
#pragma GCC unroll 12
  for (int r = 0; r < kMR; ++r) {
    V acc = sq[r];
    for (int v = 0; v < kNV; ++v) {
      const V y = c[r][v] - m[v];
      acc += y * y;
    }
    sq[r] = acc;
  }
}

template <class T>
inline double hsum(const typename VecOf<T>::type& v) {
  double s = 0.0;
  for (int i = 0; i < lanes<T>(); ++i) s += static_cast<double>(v[i]);
  return s;
}

// Phase 1 for n rows: D (n x K, float64) = ||R_k z - b_k||^2 accumulated in T.
template <class T>
void chol_margins(const T* Z, index_t n, index_t d, index_t ldz, const T* rpack, const T* rbias, index_t K,
                  double* D) {
  using V = typename VecOf<T>::type;
  constexpr index_t NR = panel_width<T>(), TW = tile_width<T>();
  const index_t np = (d + NR - 1) / NR, dp = np * NR;
  std::vector<index_t> off(np + 1, 0);
  for (index_t p = 0; p < np; ++p) off[p + 1] = off[p] + (d - p * NR) * NR;
  const index_t cls = off[np];
  const index_t nblocks = (n + kMB - 1) / kMB;
  const index_t threads = omp_get_max_threads();
  // enough work items for every thread: split the classes when there are few row blocks
  const index_t ng = nblocks >= 4 * threads ? 1 : std::min<index_t>(K, (4 * threads + nblocks - 1) / nblocks);
  const index_t kg = (K + ng - 1) / ng;
#pragma omp parallel if (worth_parallel(double(n) * K * d * (d + 1) / 2))
  {
    std::vector<T> zp(static_cast<size_t>(kMB) * d);
    std::vector<V> sq(kMB);
#pragma omp for schedule(dynamic) collapse(2)
    for (index_t blk = 0; blk < nblocks; ++blk) {
      for (index_t g = 0; g < ng; ++g) {
        const index_t r0 = blk * kMB, rows = std::min<index_t>(kMB, n - r0);
        const index_t strips = (rows + kMR - 1) / kMR;
        const index_t k0 = g * kg, k1 = std::min(K, k0 + kg);
        if (k0 >= k1) continue;
        pack_strips<T>(Z + r0 * ldz, rows, d, ldz, zp.data());
        for (index_t k = k0; k < k1; ++k) {
          std::fill(sq.begin(), sq.begin() + strips * kMR, V{});
          const T* rk = rpack + k * cls;
          const T* bk = rbias + k * dp;
          for (index_t p = 0; p < np; ++p) {
            const index_t i0 = p * NR;
            for (index_t j = 0; j < NR; j += TW)
              for (index_t s = 0; s < strips; ++s)
                chol_tile<T>(zp.data() + s * kMR * d + i0 * kMR, rk + off[p] + j, d - i0, NR, bk + i0 + j,
                             sq.data() + s * kMR);
          }
          for (index_t row = 0; row < rows; ++row) D[(r0 + row) * K + k] = hsum<T>(sq[row]);
        }
      }
    }
  }
}

struct Pair {
  index_t row, k;
};

// u-hat = P_k z - P_k mu_k for a list of (row, class) pairs: the pairs are sorted by class,
// their rows gathered, one GEMM per class. Returns, for pair i of `pairs`, its row of U.
template <class T>
void exact_u(const T* Z, index_t ldz, index_t d, const T* prec, const T* prec_mu, index_t K,
             const std::vector<Pair>& pairs, std::vector<T>& Zg, std::vector<T>& U, std::vector<index_t>& slot) {
  const index_t m = static_cast<index_t>(pairs.size());
  std::vector<index_t> start(K + 1, 0);
  for (const Pair& pr : pairs) ++start[pr.k + 1];
  for (index_t k = 0; k < K; ++k) start[k + 1] += start[k];
  std::vector<index_t> fill(start.begin(), start.end() - 1);
  slot.resize(m);
  for (index_t i = 0; i < m; ++i) slot[i] = fill[pairs[i].k]++;
  Zg.resize(static_cast<size_t>(m) * d);
  U.resize(static_cast<size_t>(m) * d);
#pragma omp parallel for schedule(static) if (worth_parallel(double(m) * d))
  for (index_t i = 0; i < m; ++i) std::memcpy(Zg.data() + slot[i] * d, Z + pairs[i].row * ldz, sizeof(T) * d);
  for (index_t k = 0; k < K; ++k) {
    const index_t cnt = start[k + 1] - start[k];
    if (cnt == 0) continue;
    gemm_nt<T>(cnt, d, d, Zg.data() + start[k] * d, d, prec + k * d * d, d, U.data() + start[k] * d, d,
               /*prefer_blas=*/true);
  }
#pragma omp parallel for schedule(static) if (worth_parallel(double(m) * d))
  for (index_t i = 0; i < m; ++i) {
    T* u = U.data() + slot[i] * d;
    const T* pm = prec_mu + pairs[i].k * d;
#pragma omp simd
    for (index_t t = 0; t < d; ++t) u[t] -= pm[t];
  }
}

}  // namespace

template <class T>
void full_certify_chol(const T* Z, index_t B, index_t d, index_t ldz, const T* rpack, const T* rbias,
                       const double* kappa, const double* rho, const double* sigma, const double* eps, const T* prec,
                       const T* prec_mu, const double* prec_abs_up, const double* mu_norm_up, index_t K,
                       const double* lam, const PerClassConsts* fp, int64_t* pred, double* radius) {
  if (B == 0) return;
  // the constants of gmfast._fp.perclass_constants (fp null: fp_sound=False, none needed)
  const bool fp_sound = fp != nullptr;
  const PerClassConsts cst = fp_sound ? *fp : PerClassConsts{};
  const double u = cst.u, g_ = cst.g, gd = cst.gd, S = cst.S, nu = cst.nu, tiny_u = cst.tiny_u,
               tiny_d = cst.tiny_d, up4 = cst.up4;
  // rows per chunk: the n x K tables and the gathered pairs stay a few tens of MB
  const index_t chunk = std::max<index_t>(kMR, std::min<index_t>(4096, (index_t{1} << 21) / std::max(K, d)));
  std::vector<double> D, Q, UB;
  std::vector<int> alive;
  std::vector<double> zm0, ubc, dpc, best, pruned;
  std::vector<int64_t> c_of;
  std::vector<T> Zg, U, Zg2, U2;
  std::vector<index_t> slotA, slotB, cslot;
  for (index_t r0 = 0; r0 < B; r0 += chunk) {
    const index_t n = std::min(chunk, B - r0);
    const T* Zc = Z + r0 * ldz;
    D.assign(static_cast<size_t>(n) * K, 0.0);
    chol_margins<T>(Zc, n, d, ldz, rpack, rbias, K, D.data());
    alive.assign(n, 0);
    c_of.assign(n, 0);
#pragma omp parallel for schedule(static) if (worth_parallel(double(n) * K * 4))
    for (index_t r = 0; r < n; ++r) {
      const double* Dr = D.data() + r * K;
      bool finite = true;
      index_t c = 0;
      double fc = kappa[0] - 0.5 * Dr[0];
      for (index_t k = 0; k < K; ++k) {
        const double f = kappa[k] - 0.5 * Dr[k];
        finite = finite && std::isfinite(f);
        if (f > fc) { fc = f; c = k; }
      }
      c_of[r] = c;
      alive[r] = finite;
      pred[r0 + r] = finite ? c : -1;
      if (lam != nullptr && !finite) radius[r0 + r] = 0.0;
    }
    if (lam == nullptr) continue;

    // Per row and class: the lowered margin q and the bound ub on ||u_k||; the round-A pairs.
    Q.assign(static_cast<size_t>(n) * K, 0.0);
    UB.assign(static_cast<size_t>(n) * K, 0.0);
    zm0.assign(n, 0.0);
    ubc.assign(n, 0.0);
    constexpr int kFirst = 2;  // exact pairs per row in round A besides c
    std::vector<index_t> firstj(static_cast<size_t>(n) * kFirst, -1);
#pragma omp parallel if (worth_parallel(double(n) * K * 16))
    {
      std::vector<double> e(K);
#pragma omp for schedule(static)
      for (index_t r = 0; r < n; ++r) {
        if (!alive[r]) continue;
        const double* Dr = D.data() + r * K;
        double* q = Q.data() + r * K;
        double* ub = UB.data() + r * K;
        const index_t c = c_of[r];
        double zn = 0.0;
        if (fp_sound) {
          const T* z = Zc + r * ldz;
          double ss = 0.0;
#pragma omp simd reduction(+ : ss)
          for (index_t t = 0; t < d; ++t) ss += static_cast<double>(z[t]) * static_cast<double>(z[t]);
          zn = norm_up_from_ss<double>(ss, d);
        }
        zm0[r] = zn;
        for (index_t k = 0; k < K; ++k) {
          if (fp_sound) {
            const double zm = zn + mu_norm_up[k];
            const double yn = std::sqrt((Dr[k] + tiny_d) / (1.0 - gd)) * up4;
            const double dy = g_ * rho[k] * zm + u * yn + tiny_u;
            e[k] = S * (gd * yn * yn + dy * (2.0 * yn + dy) + eps[k] * zm * zm + tiny_d);
            ub[k] = (sigma[k] * (yn + dy) + eps[k] * zm) * up4;
          } else {
            e[k] = 0.0;
            ub[k] = sigma[k] * std::sqrt(std::max(Dr[k], 0.0));
          }
        }
        const double fc = kappa[c] - 0.5 * Dr[c];
        const double magc = std::fabs(kappa[c]) + std::fabs(Dr[c]);
        double top[kFirst];
        index_t* fj = firstj.data() + r * kFirst;
        for (int i = 0; i < kFirst; ++i) top[i] = kInf;
        for (index_t j = 0; j < K; ++j) {
          if (j == c) continue;
          double qj = fc - (kappa[j] - 0.5 * Dr[j]);
          if (fp_sound) qj = qj - 0.5 * S * (e[c] + e[j]) - 4.0 * kU64 * (magc + std::fabs(kappa[j]) + std::fabs(Dr[j]));
          q[j] = qj;
          const double g = fp_sound ? S * (ub[c] + ub[j]) : ub[c] + ub[j];
          const double rl = pair_radius(qj, g, lam[c * K + j]);
          for (int i = 0; i < kFirst; ++i)  // insertion into the kFirst smallest
            if (rl < top[i] || fj[i] < 0) {
              for (int m = kFirst - 1; m > i; --m) { top[m] = top[m - 1]; fj[m] = fj[m - 1]; }
              top[i] = rl;
              fj[i] = j;
              break;
            }
        }
        ubc[r] = ub[c];
      }
    }

    // The exact radius of pair (r, j) from u-hat_c and u-hat_j.
    auto exact_radius = [&](index_t r, index_t j, const T* uc, const T* uj, double dpc_r, double ubc_r) {
      double gg = 0.0, uu = 0.0;
#pragma omp simd reduction(+ : gg, uu)
      for (index_t t = 0; t < d; ++t) {
        const T diff = uc[t] - uj[t];
        gg += static_cast<double>(diff) * static_cast<double>(diff);
        uu += static_cast<double>(uj[t]) * static_cast<double>(uj[t]);
      }
      double G = std::sqrt(gg);
      const double ubj = UB[r * K + j];
      if (fp_sound) {
        const double dpj = g_ * prec_abs_up[j] * (zm0[r] + mu_norm_up[j]) + u * (std::sqrt(uu) + nu) + tiny_u;
        G = std::min(S * ((G + nu) * (1.0 + u) + dpc_r + dpj), S * (ubc_r + ubj));
      } else {
        G = std::min(G, ubc_r + ubj);
      }
      return pair_radius(Q[r * K + j], G, lam[c_of[r] * K + j]);
    };

    // Round A: c and the kFirst most promising pairs of every row.
    std::vector<Pair> pa;
    pa.reserve(static_cast<size_t>(n) * (1 + kFirst));
    cslot.assign(n, -1);
    for (index_t r = 0; r < n; ++r) {
      if (!alive[r]) continue;
      cslot[r] = static_cast<index_t>(pa.size());
      pa.push_back({r, c_of[r]});
      for (int i = 0; i < kFirst; ++i)
        if (firstj[r * kFirst + i] >= 0) pa.push_back({r, firstj[r * kFirst + i]});
    }
    exact_u<T>(Zc, ldz, d, prec, prec_mu, K, pa, Zg, U, slotA);
    dpc.assign(n, 0.0);
    best.assign(n, kInf);
    pruned.assign(n, kInf);
#pragma omp parallel for schedule(static) if (worth_parallel(double(n) * (K + d) * 8))
    for (index_t r = 0; r < n; ++r) {
      if (!alive[r]) continue;
      const index_t ic = cslot[r];
      const T* uc = U.data() + slotA[ic] * d;
      double uu = 0.0;
#pragma omp simd reduction(+ : uu)
      for (index_t t = 0; t < d; ++t) uu += static_cast<double>(uc[t]) * static_cast<double>(uc[t]);
      const index_t c = c_of[r];
      if (fp_sound) {
        const double un = std::sqrt(uu) + nu;
        dpc[r] = g_ * prec_abs_up[c] * (zm0[r] + mu_norm_up[c]) + u * un + tiny_u;
        ubc[r] = std::min(ubc[r], (un + dpc[r]) * up4);
      } else {
        ubc[r] = std::min(ubc[r], std::sqrt(uu));
      }
      double b = kInf;
      for (int i = 0; i < kFirst; ++i) {
        const index_t j = firstj[r * kFirst + i];
        if (j < 0) continue;
        b = std::min(b, exact_radius(r, j, uc, U.data() + slotA[ic + 1 + i] * d, dpc[r], ubc[r]));
      }
      best[r] = b;
    }

    // Round B: every other pair whose cheap bound is below the best exact radius; the rest
    // keep their (sound) cheap bound, which cannot be the minimum.
    std::vector<Pair> pb;
    for (index_t r = 0; r < n; ++r) {
      if (!alive[r]) continue;
      const index_t c = c_of[r];
      const index_t* fj = firstj.data() + r * kFirst;
      for (index_t j = 0; j < K; ++j) {
        if (j == c || std::find(fj, fj + kFirst, j) != fj + kFirst) continue;
        const double g = fp_sound ? S * (ubc[r] + UB[r * K + j]) : ubc[r] + UB[r * K + j];
        const double rl = pair_radius(Q[r * K + j], g, lam[c * K + j]);
        if (rl < best[r]) pb.push_back({r, j});
        else pruned[r] = std::min(pruned[r], rl);
      }
    }
    const size_t cap = std::max<size_t>(1024, (size_t{1} << 22) / static_cast<size_t>(d));
    std::vector<double> rr;
    for (size_t s0 = 0; s0 < pb.size(); s0 += cap) {
      const size_t s1 = std::min(pb.size(), s0 + cap);
      std::vector<Pair> part(pb.begin() + s0, pb.begin() + s1);
      exact_u<T>(Zc, ldz, d, prec, prec_mu, K, part, Zg2, U2, slotB);
      const index_t m = static_cast<index_t>(part.size());
      rr.assign(m, kInf);
#pragma omp parallel for schedule(static) if (worth_parallel(double(m) * d * 4))
      for (index_t i = 0; i < m; ++i) {
        const index_t r = part[i].row;
        rr[i] = exact_radius(r, part[i].k, U.data() + slotA[cslot[r]] * d, U2.data() + slotB[i] * d, dpc[r], ubc[r]);
      }
      for (index_t i = 0; i < m; ++i) best[part[i].row] = std::min(best[part[i].row], rr[i]);
    }
    for (index_t r = 0; r < n; ++r) {
      if (!alive[r]) continue;
      double rad = std::min(best[r], pruned[r]);
      if (fp_sound) rad *= cst.down8;
      radius[r0 + r] = std::isnan(rad) ? 0.0 : rad;
    }
  }
}

template void full_certify_chol<float>(const float*, index_t, index_t, index_t, const float*, const float*,
                                       const double*, const double*, const double*, const double*, const float*,
                                       const float*, const double*, const double*, index_t, const double*, const PerClassConsts*,
                                       int64_t*, double*);
template void full_certify_chol<double>(const double*, index_t, index_t, index_t, const double*, const double*,
                                        const double*, const double*, const double*, const double*, const double*,
                                        const double*, const double*, const double*, index_t, const double*, const PerClassConsts*,
                                        int64_t*, double*);

}  // namespace gmfast
