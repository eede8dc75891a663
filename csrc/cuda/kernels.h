// CUDA kernel contracts of gmfast._C_cuda (the math: gmfast/ops/_reference.py, docs/DESIGN.md §1.3–1.5; the contract:
// gmfast/ops/certify.py). Host functions take device pointers, shapes and the stream to
// launch on; they only enqueue work (no synchronisation) and check every launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "constants.h"

namespace gmfast {
namespace cuda {

using index_t = int64_t;
using gmfast::PerClassConsts;
using gmfast::PerClassKind;
using gmfast::TiedConsts;

// A CUDA runtime failure (no device or driver, no kernel image for this GPU, a failed
// launch). Python sees gmfast._C_cuda.CudaError, a RuntimeError.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Rows per chunk of the scratch-using kernels at most (keeps GEMM grids within 65535 row
// tiles); larger `chunk` arguments are clamped to it.
constexpr index_t kMaxChunkRows = index_t(1) << 21;

// Throws CudaError "gmfast CUDA: <what>: <error string>" unless err is cudaSuccess.
void check(cudaError_t err, const char* what);

// C (M x N, row-major, contiguous) = fl(X Y^T) + bias, with X (M x Kd, row stride ldx,
// unit inner stride), Y (N x Kd) and bias (N) contiguous, all in T; IEEE products with
// FMA (covered by the gamma_n bounds of every caller, which hold for any summation order).
// If ss is non-null it receives fl(||X_m||^2) per row, accumulated in T.
template <class T>
void gemm_nt_bias(index_t M, index_t N, index_t Kd, const T* X, index_t ldx, const T* Y, const T* bias, T* C,
                  T* ss, cudaStream_t stream);

// Tied certify (gmfast.ops._reference.tied_certify): logits l = Z A^T + beta for chunks of
// `chunk` rows into the scratch `logits` (chunk x K) and `ss` (chunk), then per row the
// argmax c (lowest index on ties) and, when inv is non-null, the radius
// min_{j != c} max(0, m_cj - E_cj) * inv[c, j] in float64 (E_cj = 0 when fp is null).
// Rows with a non-finite logit get pred -1, radius 0. own_gemm false: the caller has put
// the logits of all B rows in `logits` (chunk >= B; an IEEE GEMM in T, e.g. cuBLAS with TF32
// off: the bound covers any inner product of length d + 1 in T) and ss is computed here.
//   Z (B x d, row stride ldz), A (K x d), beta (K) in T;  inv (K x K), alpha, eps (K) float64
//   fp: host pointer to the constants (gmfast._fp.tied_constants) or null (fp_sound=False;
//   alpha and eps are then unused)
//   pred (B) int64;  radius (B) float64 (written only when inv is non-null)
template <class T>
void tied_certify(const T* Z, index_t B, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  const double* inv, const double* alpha, const double* eps, const TiedConsts* fp, int64_t* pred,
                  double* radius, T* logits, T* ss, index_t chunk, bool own_gemm, cudaStream_t stream);

// Per-class certify (gmfast.ops._reference.perclass_certify), same formulas; the constants
// come from gmfast._fp.perclass_constants through fp (host pointer; null: fp_sound=False).
//   prec: full (K x d x d), diag (K x d), spherical (K);  mu, neg_prec_mu (= -P_k mu_k) (K x d)
//   kappa, prec_abs_up, mu_norm_up (K) float64;  lam (K x K) float64 or null (predict only)
//   U: scratch (chunk x K*d) for full (unused otherwise); own_gemm false: the caller has put
//   u-hat of all B rows in U (chunk >= B; an IEEE GEMM in T with the bias -P mu)
template <class T>
void perclass_certify(const T* Z, index_t B, index_t d, index_t ldz, PerClassKind kind, const T* mu, const T* prec,
                      const T* neg_prec_mu, const double* kappa, const double* prec_abs_up,
                      const double* mu_norm_up, index_t K, const double* lam, const PerClassConsts* fp,
                      int64_t* pred, double* radius, T* U, index_t chunk, bool own_gemm, cudaStream_t stream);

}  // namespace cuda
}  // namespace gmfast
