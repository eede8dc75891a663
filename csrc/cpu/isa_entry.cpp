// One ISA build's table of entry points (isa_table.h); compiled once per ISA with
// GMFAST_ISA_TABLE naming the table and the namespace renamed (CMakeLists.txt).
#include <omp.h>

#include "cpu/isa_table.h"
#include "cpu/kernels.h"
#include "cpu/microkernel.h"

#ifndef GMFAST_ISA_TABLE
#error "compile isa_entry.cpp through CMakeLists.txt (it defines GMFAST_ISA_TABLE and GMFAST_ISA_NAME)"
#endif

namespace gmfast {
namespace {

// The constants arrive as the doubles of the dispatcher's struct (same layout: constants.h).
struct Consts {
  PerClassConsts value;
  const PerClassConsts* ptr;
  explicit Consts(const double* p)
      : value(p != nullptr ? consts_from<PerClassConsts>(p) : PerClassConsts{}), ptr(p != nullptr ? &value : nullptr) {}
};

template <class T>
void perclass(const T* Z, index_t B, index_t d, index_t ldz, int kind, const T* mu, const T* prec,
              const double* kappa, const double* prec_abs_up, const double* mu_norm_up, index_t K, const double* lam,
              const double* consts, int64_t* pred, double* radius) {
  const Consts c(consts);
  perclass_certify<T>(Z, B, d, ldz, static_cast<PerClassKind>(kind), mu, prec, kappa, prec_abs_up,
                      mu_norm_up, K, lam, c.ptr, pred, radius);
}

template <class T>
void chol(const T* Z, index_t B, index_t d, index_t ldz, const T* rpack, const T* rbias, const double* kappa,
          const double* rho, const double* sigma, const double* eps, const T* prec, const T* prec_mu,
          const double* prec_abs_up, const double* mu_norm_up, index_t K, const double* lam, const double* consts,
          int64_t* pred, double* radius) {
  const Consts c(consts);
  full_certify_chol<T>(Z, B, d, ldz, rpack, rbias, kappa, rho, sigma, eps, prec, prec_mu, prec_abs_up, mu_norm_up,
                       K, lam, c.ptr, pred, radius);
}

// kMR x kNV independent accumulator chains: enough to cover the FMA latency times the number
// of FMA pipes on the CPUs these paths target, and exactly the microkernel's register tile.
double fma_probe(int64_t iters, double* flops) {
  using V = vfloat;
  double total = 0.0;
  int threads = 1;
#pragma omp parallel reduction(+ : total)
  {
#pragma omp single
    threads = omp_get_num_threads();
    volatile float seed = 1e-7f;
    const V x = V{} + seed, y = V{} + (1.0f - seed);
    V acc[kMR][kNV];
    for (int r = 0; r < kMR; ++r)
      for (int v = 0; v < kNV; ++v) acc[r][v] = V{} + static_cast<float>(r * kNV + v);
    for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 24
      for (int r = 0; r < kMR; ++r)
        for (int v = 0; v < kNV; ++v) acc[r][v] = acc[r][v] * y + x;
    }
    for (int r = 0; r < kMR; ++r)
      for (int v = 0; v < kNV; ++v)
        for (int l = 0; l < lanes<float>(); ++l) total += acc[r][v][l];
  }
  *flops = 2.0 * static_cast<double>(iters) * kMR * kNV * lanes<float>() * threads;
  return total;
}

}  // namespace
}  // namespace gmfast

extern "C" const GmfastIsaTable GMFAST_ISA_TABLE = {
    GMFAST_ISA_NAME,
    gmfast::kMR,
    static_cast<int>(gmfast::tile_width<float>()),
    &gmfast::tied_certify<float>,
    &gmfast::tied_certify<double>,
    &gmfast::perclass<float>,
    &gmfast::perclass<double>,
    &gmfast::chol<float>,
    &gmfast::chol<double>,
    &gmfast::fma_probe,
};
