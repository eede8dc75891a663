// NT GEMM with a column bias (and optional row sums of squares) for the tied logits and
// the stacked per-class precisions. Dependency-light on purpose: no cuBLAS (its static
// library is hundreds of MB and the toolkit here ships without it); a register-blocked
// shared-memory kernel with a one-tile register prefetch.
//
// Each block computes a BM x BN tile of C; each of its (BM/TM)(BN/TN) threads a TM x TN
// sub-tile whose rows are ty, ty + BM/TM, ... and columns tx, tx + BN/TN, ... (strided, so
// a warp reads consecutive shared-memory words and writes consecutive columns of C).
// Tiles of X and Y are staged transposed (k-major) in shared memory, padded by one column.
// IEEE float32/float64 FMAs only (no TF32, no tensor cores): the callers' error bounds
// assume IEEE products.
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/device.h"

namespace gmfast {
namespace cuda {
namespace {

template <class T, int BM, int BN, int BK, int TM, int TN>
struct Tile {
  static constexpr int kThreads = (BM / TM) * (BN / TN);
  static constexpr int kLoadX = BM * BK / kThreads;  // elements of an X tile per thread
  static constexpr int kLoadY = BN * BK / kThreads;
  static_assert(BM % TM == 0 && BN % TN == 0, "tile must split into thread sub-tiles");
  static_assert((BM * BK) % kThreads == 0 && (BN * BK) % kThreads == 0, "tile loads must divide evenly");
  static_assert(kThreads >= BM, "one thread per row accumulates ||x||^2");
};

template <class T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    gemm_nt_bias_kernel(index_t M, index_t N, index_t Kd, const T* __restrict__ X, index_t ldx,
                        const T* __restrict__ Y, const T* __restrict__ bias, T* __restrict__ C, T* __restrict__ ss) {
  using Cfg = Tile<T, BM, BN, BK, TM, TN>;
  constexpr int NT = Cfg::kThreads;
  constexpr int TX = BN / TN;  // threads along n
  constexpr int TY = BM / TM;  // threads along m
  __shared__ T xs[BK][BM + 1];
  __shared__ T ys[BK][BN + 1];

  const int tid = threadIdx.x;
  const int tx = tid % TX, ty = tid / TX;
  const index_t n0 = static_cast<index_t>(blockIdx.x) * BN;
  const index_t m0 = static_cast<index_t>(blockIdx.y) * BM;
  // Only the first column of blocks writes ||x||^2 (every block sees the same X rows).
  const bool want_ss = ss != nullptr && blockIdx.x == 0 && tid < BM;

  T xr[Cfg::kLoadX], yr[Cfg::kLoadY];
  // Element e of a tile is (row e / BK, k e % BK): consecutive threads read along k.
  auto fetch = [&](index_t k0) {
#pragma unroll
    for (int i = 0; i < Cfg::kLoadX; ++i) {
      const int e = tid + i * NT;
      const index_t gr = m0 + e / BK, gk = k0 + e % BK;
      xr[i] = (gr < M && gk < Kd) ? X[gr * ldx + gk] : T(0);
    }
#pragma unroll
    for (int i = 0; i < Cfg::kLoadY; ++i) {
      const int e = tid + i * NT;
      const index_t gr = n0 + e / BK, gk = k0 + e % BK;
      yr[i] = (gr < N && gk < Kd) ? Y[gr * Kd + gk] : T(0);
    }
  };
  auto stash = [&]() {
#pragma unroll
    for (int i = 0; i < Cfg::kLoadX; ++i) {
      const int e = tid + i * NT;
      xs[e % BK][e / BK] = xr[i];
    }
#pragma unroll
    for (int i = 0; i < Cfg::kLoadY; ++i) {
      const int e = tid + i * NT;
      ys[e % BK][e / BK] = yr[i];
    }
  };

  T acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
  T ssacc = T(0);

  fetch(0);
  stash();
  __syncthreads();
  for (index_t k0 = 0; k0 < Kd; k0 += BK) {
    const bool more = k0 + BK < Kd;
    if (more) fetch(k0 + BK);  // global loads in flight while this tile is multiplied
    if (want_ss) {
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        const T v = xs[k][tid];
        ssacc += v * v;
      }
    }
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      T a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = xs[k][ty + i * TY];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = ys[k][tx + j * TX];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
    if (more) {
      stash();
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const index_t gr = m0 + ty + i * TY;
    if (gr >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const index_t gc = n0 + tx + j * TX;
      if (gc < N) C[gr * N + gc] = acc[i][j] + bias[gc];
    }
  }
  if (want_ss && m0 + tid < M) ss[m0 + tid] = ssacc;
}

template <class T, int BM, int BN, int BK, int TM, int TN>
void launch(index_t M, index_t N, index_t Kd, const T* X, index_t ldx, const T* Y, const T* bias, T* C, T* ss,
            cudaStream_t stream, const char* name) {
  constexpr int NT = Tile<T, BM, BN, BK, TM, TN>::kThreads;
  const index_t gy = (M + BM - 1) / BM, gx = (N + BN - 1) / BN;
  // Callers chunk rows (kMaxChunkRows); a wider output than 2^31 column tiles is not a
  // runtime failure but an argument error (pybind11 turns length_error into ValueError).
  if (gy > 65535 || gx > 0x7fffffff)
    throw std::length_error(std::string("gmfast CUDA: ") + name + ": matrix too large for one launch");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  const auto kernel = gemm_nt_bias_kernel<T, BM, BN, BK, TM, TN>;
  GMFAST_LAUNCH(kernel, grid, NT, stream, M, N, Kd, X, ldx, Y, bias, C, ss);
  check(cudaGetLastError(), name);
}

}  // namespace

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw CudaError(std::string("gmfast CUDA: ") + what + ": " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")");
}

// Tile shapes: 128x128 (float) / 64x64 (double) for wide outputs; a 32-column tile when
// N <= 32 (few classes), where a wide tile would mostly multiply padding.
template <class T>
void gemm_nt_bias(index_t M, index_t N, index_t Kd, const T* X, index_t ldx, const T* Y, const T* bias, T* C,
                  T* ss, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (N <= 32)
      launch<T, 128, 32, 8, 4, 4>(M, N, Kd, X, ldx, Y, bias, C, ss, stream, "gemm_nt_bias_kernel<float,128x32>");
    else
      launch<T, 128, 128, 8, 8, 8>(M, N, Kd, X, ldx, Y, bias, C, ss, stream, "gemm_nt_bias_kernel<float,128x128>");
  } else {
    if (N <= 32)
      launch<T, 64, 32, 8, 4, 2>(M, N, Kd, X, ldx, Y, bias, C, ss, stream, "gemm_nt_bias_kernel<double,64x32>");
    else
      launch<T, 64, 64, 8, 4, 4>(M, N, Kd, X, ldx, Y, bias, C, ss, stream, "gemm_nt_bias_kernel<double,64x64>");
  }
}

template void gemm_nt_bias<float>(index_t, index_t, index_t, const float*, index_t, const float*, const float*,
                                  float*, float*, cudaStream_t);
template void gemm_nt_bias<double>(index_t, index_t, index_t, const double*, index_t, const double*,
                                   const double*, double*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace gmfast
