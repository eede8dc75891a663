// pybind11 module gmfast._C_cuda: raw device pointers (uintptr_t) + shapes + the CUDA
// stream from Python (torch.cuda.current_stream().cuda_stream), argument checks at the
// boundary, launches with the GIL released. Built against the static CUDA runtime, so it
// imports on a machine without a GPU or driver; the first runtime call then raises
// CudaError (device_count() is the cheap probe gmfast.ops._cuda.available() uses).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cuda/kernels.h"
#include "interface.h"

namespace py = pybind11;
using gmfast::cuda::index_t;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

template <class P>
P* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

void need(std::uintptr_t p, const char* name) {
  if (p == 0) fail(std::string(name) + ": null device pointer");
}

void check_rows(index_t B, index_t d, index_t ldz) {
  if (B < 0 || d < 1) fail("Z: expected B >= 0 rows and d >= 1 features");
  if (B > 1 && ldz < d) fail("Z: rows must not overlap (row stride >= d) and have unit inner stride");
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// The rounding-error constants (gmfast._fp) as the kernels' struct S, or nothing for None.
template <class S>
std::optional<S> consts_of(const std::optional<std::vector<double>>& v, std::size_t count) {
  if (!v) return std::nullopt;
  if (v->size() != count)
    fail("consts: expected " + std::to_string(count) + " values, got " + std::to_string(v->size()));
  return gmfast::consts_from<S>(v->data());
}

template <class T>
void tied(int device, std::uintptr_t Z, index_t B, index_t d, index_t ldz, std::uintptr_t A, std::uintptr_t beta,
          index_t K, std::uintptr_t inv, std::uintptr_t alpha, std::uintptr_t eps,
          std::optional<std::vector<double>> consts, std::uintptr_t pred, std::uintptr_t radius, std::uintptr_t logits,
          std::uintptr_t ss, index_t chunk, std::uintptr_t stream, bool gemm) {
  check_rows(B, d, ldz);
  if (K < 1) fail("A: expected at least one class");
  if (!gemm && chunk < B) fail("gemm=False (logits given): expected chunk >= B, one chunk");
  if ((alpha == 0) != (eps == 0)) fail("alpha and eps must both be given or both be null");
  if ((alpha == 0) != !consts) fail("consts must be given exactly when alpha and eps are");
  const auto cst = consts_of<gmfast::TiedConsts>(consts, gmfast::kTiedConstsCount);
  if (B == 0) return;
  for (auto [p, name] : {std::pair{Z, "Z"}, {A, "A"}, {beta, "beta"}, {pred, "pred"}, {logits, "logits"}})
    need(p, name);
  if (inv != 0) need(radius, "radius");
  if (alpha != 0 && inv != 0) need(ss, "ss");
  if (chunk < 1) fail("chunk: expected >= 1 rows");
  py::gil_scoped_release release;
  gmfast::cuda::check(cudaSetDevice(device), "cudaSetDevice");
  gmfast::cuda::tied_certify<T>(as_ptr<const T>(Z), B, d, ldz, as_ptr<const T>(A), as_ptr<const T>(beta), K,
                                as_ptr<const double>(inv), as_ptr<const double>(alpha), as_ptr<const double>(eps),
                                cst ? &*cst : nullptr, as_ptr<int64_t>(pred), as_ptr<double>(radius),
                                as_ptr<T>(logits), as_ptr<T>(ss),
                                chunk, gemm, as_stream(stream));
}

template <class T>
void perclass(int device, std::uintptr_t Z, index_t B, index_t d, index_t ldz, int kind, std::uintptr_t mu,
              std::uintptr_t prec, std::uintptr_t neg_prec_mu, std::uintptr_t kappa, std::uintptr_t prec_abs_up,
              std::uintptr_t mu_norm_up, index_t K, std::uintptr_t lam, std::optional<std::vector<double>> consts,
              std::uintptr_t pred, std::uintptr_t radius, std::uintptr_t U, index_t chunk, std::uintptr_t stream,
              bool gemm) {
  check_rows(B, d, ldz);
  const auto cst = consts_of<gmfast::PerClassConsts>(consts, gmfast::kPerClassConstsCount);
  if (K < 1) fail("mu: expected at least one class");
  if (kind < 0 || kind > 2) fail("kind: expected 0 (full), 1 (diag) or 2 (spherical)");
  if (B == 0) return;
  for (auto [p, name] : {std::pair{Z, "Z"}, {mu, "mu"}, {prec, "prec"}, {kappa, "kappa"}, {pred, "pred"}})
    need(p, name);
  if (lam != 0) {
    need(radius, "radius");
    need(prec_abs_up, "prec_abs_up");
    need(mu_norm_up, "mu_norm_up");
  }
  const auto k = static_cast<gmfast::cuda::PerClassKind>(kind);
  if (k == gmfast::cuda::PerClassKind::kFull) {
    need(neg_prec_mu, "neg_prec_mu");
    need(U, "U");
    if (chunk < 1) fail("chunk: expected >= 1 rows");
    if (!gemm && chunk < B) fail("gemm=False (U given): expected chunk >= B, one chunk");
  }
  py::gil_scoped_release release;
  gmfast::cuda::check(cudaSetDevice(device), "cudaSetDevice");
  gmfast::cuda::perclass_certify<T>(as_ptr<const T>(Z), B, d, ldz, k, as_ptr<const T>(mu), as_ptr<const T>(prec),
                                    as_ptr<const T>(neg_prec_mu), as_ptr<const double>(kappa),
                                    as_ptr<const double>(prec_abs_up), as_ptr<const double>(mu_norm_up), K,
                                    as_ptr<const double>(lam), cst ? &*cst : nullptr, as_ptr<int64_t>(pred),
                                    as_ptr<double>(radius), as_ptr<T>(U), chunk, gemm, as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "gmfast CUDA kernels (raw device pointers; see gmfast/ops/_cuda.py)";
  py::register_exception<gmfast::cuda::CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.def(
      "device_count",
      [] {
        int n = 0;
        gmfast::cuda::check(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
        return n;
      },
      "Number of CUDA devices; raises CudaError when the runtime cannot start (no driver or GPU).");

  m.def(
      "kernel_interface",
      [] { return gmfast::kernel_interface_dict(); },
      "The constants' field order and the kind codes, as compiled (for tests).");

  m.def("tied_certify_f32", &tied<float>, py::arg("device"), py::arg("Z"), py::arg("B"), py::arg("d"), py::arg("ldz"),
        py::arg("A"), py::arg("beta"), py::arg("K"), py::arg("inv"), py::arg("alpha"), py::arg("eps"),
        py::arg("consts"), py::arg("pred"), py::arg("radius"), py::arg("logits"), py::arg("ss"), py::arg("chunk"),
        py::arg("stream"), py::arg("gemm") = true);
  m.def("tied_certify_f64", &tied<double>, py::arg("device"), py::arg("Z"), py::arg("B"), py::arg("d"),
        py::arg("ldz"), py::arg("A"), py::arg("beta"), py::arg("K"), py::arg("inv"), py::arg("alpha"),
        py::arg("eps"), py::arg("consts"), py::arg("pred"), py::arg("radius"), py::arg("logits"), py::arg("ss"),
        py::arg("chunk"), py::arg("stream"), py::arg("gemm") = true);
  m.def("perclass_certify_f32", &perclass<float>, py::arg("device"), py::arg("Z"), py::arg("B"), py::arg("d"),
        py::arg("ldz"), py::arg("kind"), py::arg("mu"), py::arg("prec"), py::arg("neg_prec_mu"), py::arg("kappa"),
        py::arg("prec_abs_up"), py::arg("mu_norm_up"), py::arg("K"), py::arg("lam"), py::arg("consts"),
        py::arg("pred"), py::arg("radius"), py::arg("U"), py::arg("chunk"), py::arg("stream"),
        py::arg("gemm") = true);
  m.def("perclass_certify_f64", &perclass<double>, py::arg("device"), py::arg("Z"), py::arg("B"), py::arg("d"),
        py::arg("ldz"), py::arg("kind"), py::arg("mu"), py::arg("prec"), py::arg("neg_prec_mu"), py::arg("kappa"),
        py::arg("prec_abs_up"), py::arg("mu_norm_up"), py::arg("K"), py::arg("lam"), py::arg("consts"),
        py::arg("pred"), py::arg("radius"), py::arg("U"), py::arg("chunk"), py::arg("stream"),
        py::arg("gemm") = true);
}
