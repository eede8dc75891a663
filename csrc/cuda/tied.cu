// Tied certify on the GPU: logits of a bounded chunk of rows by gemm_nt_bias (beta and
// fl(||z||^2) fused into it), or given by the caller (cuBLAS through torch.addmm, IEEE:
// gmfast/ops/_cuda.py; fl(||z||^2) then by row_sumsq_kernel), then a warp per row: pass 1
// over the K logits for the argmax c (lowest index on ties), pass 2 for min_{j != c} of the
// margin ratio with c known. Scratch: chunk x K logits, never B x K unless B fits in one chunk.
//
// Soundness: exactly the formula of gmfast.ops._reference.tied_epilogue. The logits differ from
// the exact a_k^T z + beta_k by at most e_k = alpha_k ||z|| + eps_k (gamma_{d+2}, Higham's
// bound for any order, FMA or not); ||z|| is bounded above from fl(sum z^2) accumulated in
// T (norm_up with the constants of gmfast._fp.tied_constants). Margins, error terms, products and the
// min over ALL j != c are float64: E_cj = (e_c + e_j)(1 + 8u) + 2u|m|, num <= 0 -> 0,
// times (1 - 8u). nvcc keeps float64 division and square root IEEE, does not flush
// float64 subnormals, and FMA contraction only removes roundings from these bounds.
#include <algorithm>

#include "cuda/device.h"

namespace gmfast {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per row

// ss[r] = fl(sum_i Z[r, i]^2) accumulated in T (per lane with FMA, then the warp's sum):
// the rows' squared norms when the caller computed the logits.
template <class T>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
    row_sumsq_kernel(index_t R, index_t d, const T* __restrict__ Z, index_t ldz, T* __restrict__ ss) {
  const int lane = threadIdx.x % kWarp;
  const index_t row = static_cast<index_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= R) return;  // uniform per warp
  const T* z = Z + row * ldz;
  T s = T(0);
  for (index_t i = lane; i < d; i += kWarp) s = fma(z[i], z[i], s);
  s = warp_sum(s);
  if (lane == 0) ss[row] = s;
}

template <class T>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
    tied_epilogue_kernel(index_t R, index_t K, const T* __restrict__ L, const T* __restrict__ ss,
                         const double* __restrict__ inv, const double* __restrict__ alpha,
                         const double* __restrict__ eps, TiedConsts cst, int64_t* __restrict__ pred,
                         double* __restrict__ radius) {
  const int lane = threadIdx.x % kWarp;
  const index_t row = static_cast<index_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= R) return;  // uniform per warp
  const T* l = L + row * K;

  T best = -infinity<T>();
  index_t c = K;
  int finite = 1;
  for (index_t k = lane; k < K; k += kWarp) {
    const T v = l[k];
    finite &= isfinite(v) ? 1 : 0;
    if (v > best) {  // strict: a lane keeps its lowest index among equal values
      best = v;
      c = k;
    }
  }
  warp_argmax(best, c);
  finite = __all_sync(kFullMask, finite);
  if (!finite) {
    if (lane == 0) {
      pred[row] = -1;
      if (inv != nullptr) radius[row] = 0.0;
    }
    return;
  }
  if (inv == nullptr) {
    if (lane == 0) pred[row] = c;
    return;
  }
  const double lc = static_cast<double>(best);
  const double* irow = inv + c * K;
  double zn = 0.0, ec = 0.0;
  if (alpha != nullptr) {
    zn = norm_up(static_cast<double>(ss[row]), cst);
    ec = alpha[c] * zn + eps[c];
  }
  double r = infinity<double>();
  for (index_t k = lane; k < K; k += kWarp) {
    const double m = lc - static_cast<double>(l[k]);
    double num = m;
    if (alpha != nullptr) num = m - ((ec + (alpha[k] * zn + eps[k])) * cst.up4 + cst.two_u64 * fabs(m));
    // num > 0 with inv = +inf gives +inf: class k can never overtake c.
    double v = num > 0.0 ? num * irow[k] : 0.0;
    if (k == c) v = infinity<double>();
    r = fmin(r, v);
  }
  r = warp_min(r);
  if (lane == 0) {
    pred[row] = c;
    radius[row] = alpha != nullptr ? r * cst.down4 : r;
  }
}

}  // namespace

template <class T>
void tied_certify(const T* Z, index_t B, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  const double* inv, const double* alpha, const double* eps, const TiedConsts* fp, int64_t* pred,
                  double* radius, T* logits, T* ss, index_t chunk, bool own_gemm, cudaStream_t stream) {
  if (B == 0) return;
  chunk = std::min(chunk, kMaxChunkRows);
  const bool fp_sound = inv != nullptr && fp != nullptr;
  const TiedConsts cst = fp_sound ? *fp : TiedConsts{};
  for (index_t r0 = 0; r0 < B; r0 += chunk) {
    const index_t rows = std::min(chunk, B - r0);
    const index_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    if (own_gemm) {
      gemm_nt_bias<T>(rows, K, d, Z + r0 * ldz, ldz, A, beta, logits, fp_sound ? ss : nullptr, stream);
    } else if (fp_sound) {
      const auto sumsq = row_sumsq_kernel<T>;
      GMFAST_LAUNCH(sumsq, static_cast<unsigned>(blocks), kRowsPerBlock * kWarp, stream, rows, d, Z + r0 * ldz, ldz,
                    ss);
      check(cudaGetLastError(), "row_sumsq_kernel");
    }
    const auto kernel = tied_epilogue_kernel<T>;
    GMFAST_LAUNCH(kernel, static_cast<unsigned>(blocks), kRowsPerBlock * kWarp, stream, rows, K, logits, ss, inv,
                  fp_sound ? alpha : nullptr, fp_sound ? eps : nullptr, cst, pred + r0,
                  inv != nullptr ? radius + r0 : nullptr);
    check(cudaGetLastError(), "tied_epilogue_kernel");
  }
}

template void tied_certify<float>(const float*, index_t, index_t, index_t, const float*, const float*, index_t,
                                  const double*, const double*, const double*, const TiedConsts*, int64_t*, double*,
                                  float*, float*, index_t, bool, cudaStream_t);
template void tied_certify<double>(const double*, index_t, index_t, index_t, const double*, const double*, index_t,
                                   const double*, const double*, const double*, const TiedConsts*, int64_t*, double*,
                                   double*, double*, index_t, bool, cudaStream_t);

}  // namespace cuda
}  // namespace gmfast
