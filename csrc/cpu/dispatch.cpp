// Runtime dispatch between the ISA builds of the CPU kernels, and the state they share.
//
// Compiled for the baseline of the target (x86-64: SSE2) like bindings.cpp: nothing here may
// use an instruction the oldest supported CPU lacks. Each ISA build (isa_table.h) is reached
// only through its table, and only after the CPU was found to support it: GCC's
// __builtin_cpu_supports reports AVX/AVX-512 features only when the OS also saves their
// registers (XCR0), so a path it accepts cannot fault. The default is the fastest supported
// path; GMFAST_CPU_ISA (read in gmfast/ops/_cpu.py) or set_cpu_isa forces another.
#include "cpu/dispatch.h"

#include <atomic>
#include <chrono>
#include <type_traits>

#include "common.h"
#include "cpu/isa_table.h"
#include "cpu/kernels.h"

namespace {

std::atomic<GmfastSgemm> g_sgemm{nullptr};
std::atomic<GmfastDgemm> g_dgemm{nullptr};
std::atomic<int> g_policy{static_cast<int>(gmfast::GemmPolicy::kAuto)};
std::atomic<int> g_screen{1};

const GmfastIsaTable* const kTables[] = {
#if defined(GMFAST_HAVE_AVX512)
    &gmfast_isa_avx512,
#endif
#if defined(GMFAST_HAVE_AVX2)
    &gmfast_isa_avx2,
#endif
    &gmfast_isa_portable,
};
constexpr int kCount = static_cast<int>(sizeof(kTables) / sizeof(kTables[0]));

bool supported(const GmfastIsaTable* t) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const std::string n = t->name;
  if (n == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  if (n == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  (void)t;
  return true;  // the portable build needs only the target's baseline
}

int best() {
  for (int i = 0; i < kCount; ++i)
    if (supported(kTables[i])) return i;
  return kCount - 1;
}

std::atomic<int> g_active{-1};

const GmfastIsaTable* active() {
  int i = g_active.load(std::memory_order_relaxed);
  if (i < 0) {
    i = best();
    g_active.store(i);
  }
  return kTables[i];
}

}  // namespace

extern "C" {
GmfastSgemm gmfast_state_sgemm(void) { return g_sgemm.load(std::memory_order_relaxed); }
GmfastDgemm gmfast_state_dgemm(void) { return g_dgemm.load(std::memory_order_relaxed); }
int gmfast_state_policy(void) { return g_policy.load(std::memory_order_relaxed); }
int gmfast_state_screen(void) { return g_screen.load(std::memory_order_relaxed); }
}

namespace gmfast {

void set_blas(sgemm_fn s, dgemm_fn d) {
  g_sgemm.store(s);
  g_dgemm.store(d);
}
bool have_blas() { return g_sgemm.load() != nullptr && g_dgemm.load() != nullptr; }
void set_gemm_policy(GemmPolicy p) { g_policy.store(static_cast<int>(p)); }
GemmPolicy gemm_policy() { return static_cast<GemmPolicy>(g_policy.load()); }
void set_margin_screen(bool on) { g_screen.store(on ? 1 : 0); }
bool margin_screen() { return g_screen.load() != 0; }

int isa_count() { return kCount; }
const char* isa_name(int i) { return kTables[i]->name; }
bool isa_supported(int i) { return supported(kTables[i]); }
int isa_best() { return best(); }
int isa_active() {
  active();
  return g_active.load();
}
void isa_select(int i) { g_active.store(i); }

std::string cpu_features() {
  std::string out;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define GMFAST_FEATURE(f) \
  if (__builtin_cpu_supports(f)) out += (out.empty() ? "" : " ") + std::string(f);
  GMFAST_FEATURE("sse2")
  GMFAST_FEATURE("avx")
  GMFAST_FEATURE("avx2")
  GMFAST_FEATURE("fma")
  GMFAST_FEATURE("avx512f")
  GMFAST_FEATURE("avx512bw")
  GMFAST_FEATURE("avx512dq")
  GMFAST_FEATURE("avx512vl")
#undef GMFAST_FEATURE
#elif defined(__aarch64__)
  out = "neon (aarch64 baseline)";
#endif
  return out;
}

double isa_fma_probe(int i, int64_t iters, double* flops) {
  const auto t0 = std::chrono::steady_clock::now();
  volatile double sink = kTables[i]->fma_probe_f32(iters, flops);
  (void)sink;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <class T>
void tied_certify(const T* Z, index_t B, index_t d, index_t ldz, const T* A, const T* beta, index_t K,
                  const double* inv, const double* alpha, const double* eps, int64_t* pred, double* radius) {
  if constexpr (std::is_same_v<T, float>)
    active()->tied_f32(Z, B, d, ldz, A, beta, K, inv, alpha, eps, pred, radius);
  else
    active()->tied_f64(Z, B, d, ldz, A, beta, K, inv, alpha, eps, pred, radius);
}

template <class T>
void perclass_certify(const T* Z, index_t B, index_t d, index_t ldz, PerClassKind kind, const T* mu, const T* prec,
                      const double* kappa, const double* prec_abs_up, const double* mu_norm_up,
                      index_t K, const double* lam, const PerClassConsts* fp, int64_t* pred, double* radius) {
  const int k = static_cast<int>(kind);
  const double* fp_sound = fp != nullptr ? reinterpret_cast<const double*>(fp) : nullptr;  // packed doubles
  if constexpr (std::is_same_v<T, float>)
    active()->perclass_f32(Z, B, d, ldz, k, mu, prec, kappa, prec_abs_up, mu_norm_up, K, lam, fp_sound, pred,
                           radius);
  else
    active()->perclass_f64(Z, B, d, ldz, k, mu, prec, kappa, prec_abs_up, mu_norm_up, K, lam, fp_sound, pred,
                           radius);
}

template <class T>
void full_certify_chol(const T* Z, index_t B, index_t d, index_t ldz, const T* rpack, const T* rbias,
                       const double* kappa, const double* rho, const double* sigma, const double* eps, const T* prec,
                       const T* prec_mu, const double* prec_abs_up, const double* mu_norm_up, index_t K,
                       const double* lam, const PerClassConsts* fp, int64_t* pred, double* radius) {
  const double* fp_sound = fp != nullptr ? reinterpret_cast<const double*>(fp) : nullptr;  // packed doubles
  if constexpr (std::is_same_v<T, float>)
    active()->chol_f32(Z, B, d, ldz, rpack, rbias, kappa, rho, sigma, eps, prec, prec_mu, prec_abs_up, mu_norm_up, K,
                       lam, fp_sound, pred, radius);
  else
    active()->chol_f64(Z, B, d, ldz, rpack, rbias, kappa, rho, sigma, eps, prec, prec_mu, prec_abs_up, mu_norm_up, K,
                       lam, fp_sound, pred, radius);
}

template void tied_certify<float>(const float*, index_t, index_t, index_t, const float*, const float*, index_t,
                                  const double*, const double*, const double*, int64_t*, double*);
template void tied_certify<double>(const double*, index_t, index_t, index_t, const double*, const double*,
                                   index_t, const double*, const double*, const double*, int64_t*, double*);
template void perclass_certify<float>(const float*, index_t, index_t, index_t, PerClassKind, const float*,
                                      const float*, const double*, const double*, const double*,
                                      index_t, const double*, const PerClassConsts*, int64_t*, double*);
template void perclass_certify<double>(const double*, index_t, index_t, index_t, PerClassKind, const double*,
                                       const double*, const double*, const double*, const double*,
                                       index_t, const double*, const PerClassConsts*, int64_t*, double*);
template void full_certify_chol<float>(const float*, index_t, index_t, index_t, const float*, const float*,
                                       const double*, const double*, const double*, const double*, const float*,
                                       const float*, const double*, const double*, index_t, const double*, const PerClassConsts*,
                                       int64_t*, double*);
template void full_certify_chol<double>(const double*, index_t, index_t, index_t, const double*, const double*,
                                        const double*, const double*, const double*, const double*, const double*,
                                        const double*, const double*, const double*, index_t, const double*, const PerClassConsts*,
                                        int64_t*, double*);

}  // namespace gmfast
