// pybind11 module gmfast._C: argument checks at the boundary, then the kernels with the
// GIL released. Takes numpy buffers (zero-copy views of CPU tensors); no libtorch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "constants.h"
#include "interface.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace py = pybind11;
using gmfast::index_t;

namespace {

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

// Checks an array's dtype, shape (-1: any) and that it is C-contiguous.
template <class T>
const T* need(const py::array& a, const char* name, std::vector<index_t> shape, bool contiguous = true) {
  if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>()))
    fail(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) + ", got " +
         std::string(py::str(a.dtype())));
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) {
    std::ostringstream s;
    s << name << ": expected shape (";
    for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
    s << ")" << ", got " << shape_str(a);
    fail(s.str());
  }
  if (contiguous && !(a.flags() & py::array::c_style)) fail(std::string(name) + ": expected a C-contiguous array");
  return static_cast<const T*>(a.data());
}

// Z may have any row stride but unit inner stride.
template <class T>
const T* need_rows(const py::array& Z, index_t* B, index_t* d, index_t* ldz) {
  need<T>(Z, "Z", {-1, -1}, false);
  *B = Z.shape(0);
  *d = Z.shape(1);
  const index_t s0 = Z.strides(0) / static_cast<index_t>(sizeof(T));
  const index_t s1 = Z.strides(1) / static_cast<index_t>(sizeof(T));
  if (*B > 0 && *d > 1 && s1 != 1) fail("Z: expected unit stride along features (make it contiguous)");
  if (*B > 1 && (Z.strides(0) % static_cast<index_t>(sizeof(T)) != 0 || s0 < *d))
    fail("Z: rows must not overlap and be aligned to the element size");
  *ldz = (*B > 1) ? s0 : std::max<index_t>(*d, 1);
  return static_cast<const T*>(Z.data());
}

// The rounding-error constants (gmfast._fp.perclass_constants) as the kernels' struct, or
// null for None (fp_sound=False). `out` holds the struct for the call's duration.
const gmfast::PerClassConsts* perclass_consts(const std::optional<py::array>& consts, gmfast::PerClassConsts* out) {
  if (!consts) return nullptr;
  *out = gmfast::consts_from<gmfast::PerClassConsts>(
      need<double>(*consts, "consts", {static_cast<index_t>(gmfast::kPerClassConstsCount)}));
  return out;
}

// Allocates (pred, radius or None), runs kernel(pred, radius) without the GIL, returns them.
template <class F>
py::tuple certify_outputs(index_t B, bool with_radius, F&& kernel) {
  py::array_t<int64_t> pred(B);
  py::array_t<double> radius(with_radius ? B : 0);
  int64_t* po = pred.mutable_data();
  double* ro = with_radius ? radius.mutable_data() : nullptr;
  {
    py::gil_scoped_release nogil;
    kernel(po, ro);
  }
  if (!with_radius) return py::make_tuple(pred, py::none());
  return py::make_tuple(pred, radius);
}

template <class T>
py::tuple tied_certify(const py::array& Z, const py::array& A, const py::array& beta,
                       std::optional<py::array> inv, std::optional<py::array> alpha,
                       std::optional<py::array> eps) {
  index_t B, d, ldz;
  const T* z = need_rows<T>(Z, &B, &d, &ldz);
  const T* a = need<T>(A, "A", {-1, d});
  const index_t K = A.shape(0);
  if (K < 1) fail("A: expected at least one class");
  // the epilogue's argmax carries class indices as T (csrc/cpu/tied.cpp: exact below 2^24)
  if (K >= (index_t{1} << 24)) fail("A: expected fewer than 2^24 classes, got " + std::to_string(K));
  const T* b = need<T>(beta, "beta", {K});
  const double* tab = inv ? need<double>(*inv, "inv", {K, K}) : nullptr;
  if (static_cast<bool>(alpha) != static_cast<bool>(eps)) fail("alpha and eps must both be given or both None");
  const double* al = alpha ? need<double>(*alpha, "alpha", {K}) : nullptr;
  const double* ep = eps ? need<double>(*eps, "eps", {K}) : nullptr;
  return certify_outputs(B, tab != nullptr, [&](int64_t* po, double* ro) {
    gmfast::tied_certify<T>(z, B, d, ldz, a, b, K, tab, al, ep, po, ro);
  });
}

template <class T>
py::tuple perclass_certify(const py::array& Z, int kind, const py::array& mu, const py::array& prec,
                           const py::array& kappa, const py::array& prec_abs_up,
                           const py::array& mu_norm_up, std::optional<py::array> lam,
                           std::optional<py::array> consts) {
  index_t B, d, ldz;
  const T* z = need_rows<T>(Z, &B, &d, &ldz);
  const T* m = need<T>(mu, "mu", {-1, d});
  const index_t K = mu.shape(0);
  if (K < 1) fail("mu: expected at least one class");
  const T* p;
  using gmfast::PerClassKind;
  if (kind == static_cast<int>(PerClassKind::kFull))
    fail("kind 0 (full): full covariances use full_certify_chol (the Cholesky form)");
  else if (kind == static_cast<int>(PerClassKind::kDiag)) p = need<T>(prec, "prec", {K, d});
  else if (kind == static_cast<int>(PerClassKind::kSpherical)) p = need<T>(prec, "prec", {K});
  else fail("kind: expected 0 (full), 1 (diag) or 2 (spherical), got " + std::to_string(kind));
  const double* kap = need<double>(kappa, "kappa", {K});
  const double* pa = need<double>(prec_abs_up, "prec_abs_up", {K});
  const double* mn = need<double>(mu_norm_up, "mu_norm_up", {K});
  const double* la = lam ? need<double>(*lam, "lam", {K, K}) : nullptr;
  gmfast::PerClassConsts cst;
  const gmfast::PerClassConsts* fp = perclass_consts(consts, &cst);
  return certify_outputs(B, la != nullptr, [&](int64_t* po, double* ro) {
    gmfast::perclass_certify<T>(z, B, d, ldz, static_cast<gmfast::PerClassKind>(kind), m, p, kap, pa, mn, K, la,
                                fp, po, ro);
  });
}

template <class T>
py::tuple full_certify_chol(const py::array& Z, const py::array& rpack, const py::array& rbias,
                            const py::array& kappa, const py::array& rho, const py::array& sigma,
                            const py::array& eps, const py::array& prec, const py::array& prec_mu,
                            const py::array& prec_abs_up, const py::array& mu_norm_up, std::optional<py::array> lam,
                            std::optional<py::array> consts) {
  index_t B, d, ldz;
  const T* z = need_rows<T>(Z, &B, &d, &ldz);
  const double* kap = need<double>(kappa, "kappa", {-1});
  const index_t K = kappa.shape(0);
  if (K < 1) fail("kappa: expected at least one class");
  const index_t NR = gmfast::chol_panel_rows<T>();
  const index_t np = (d + NR - 1) / NR;
  index_t per_class = 0;
  for (index_t p = 0; p < np; ++p) per_class += (d - p * NR) * NR;
  const T* rp = need<T>(rpack, "rpack", {K, per_class});
  const T* rb = need<T>(rbias, "rbias", {K, np * NR});
  const double* rh = need<double>(rho, "rho", {K});
  const double* sg = need<double>(sigma, "sigma", {K});
  const double* ep = need<double>(eps, "eps", {K});
  const T* p = need<T>(prec, "prec", {K, d, d});
  const T* pm = need<T>(prec_mu, "prec_mu", {K, d});
  const double* pa = need<double>(prec_abs_up, "prec_abs_up", {K});
  const double* mn = need<double>(mu_norm_up, "mu_norm_up", {K});
  const double* la = lam ? need<double>(*lam, "lam", {K, K}) : nullptr;
  gmfast::PerClassConsts cst;
  const gmfast::PerClassConsts* fp = perclass_consts(consts, &cst);
  return certify_outputs(B, la != nullptr, [&](int64_t* po, double* ro) {
    gmfast::full_certify_chol<T>(z, B, d, ldz, rp, rb, kap, rh, sg, ep, p, pm, pa, mn, K, la, fp, po, ro);
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gmfast compiled CPU kernels (see gmfast/ops/_cpu.py for the Python side)";
  m.def(
      "set_blas",
      [](uintptr_t sgemm, uintptr_t dgemm) {
        gmfast::set_blas(reinterpret_cast<gmfast::sgemm_fn>(sgemm), reinterpret_cast<gmfast::dgemm_fn>(dgemm));
      },
      py::arg("sgemm"), py::arg("dgemm"),
      "Install Fortran-ABI (LP64) sgemm_/dgemm_ function addresses; 0, 0 restores the portable GEMM.");
  m.def("have_blas", &gmfast::have_blas);
  m.def(
      "set_gemm_policy", [](int p) {
        if (p < 0 || p > 4)
          fail("policy: expected 0 (auto), 1 (blas), 2 (portable), 3 (micro) or 4 (lanes), got " +
               std::to_string(p));
        gmfast::set_gemm_policy(static_cast<gmfast::GemmPolicy>(p));
      },
      py::arg("policy"));
  m.def("set_margin_screen", &gmfast::set_margin_screen, py::arg("on"),
        "Screen the many-class tied epilogue's classes in float32 first (default on; same radii either way).");
  m.def("margin_screen", &gmfast::margin_screen);
  // gmfast._fp.round_down_to for a CPU float64 vector of nonnegative radii -> float32: the
  // largest float32 <= each value, by the numpy path's rule (cast to nearest, then one step
  // toward zero, the bit pattern minus one, where the cast went up; inf stays inf when the
  // value is inf). ~1 us at B = 8192 where the numpy path took ~10 (a certify call at
  // (8192, 32, 10) is ~0.4 ms).
  m.def(
      "round_down_f32",
      [](const py::array& r) {
        const double* p = need<double>(r, "radius", {-1});
        const index_t n = static_cast<index_t>(r.shape(0));
        py::array_t<float> out(static_cast<py::ssize_t>(n));
        float* o = out.mutable_data();
        for (index_t i = 0; i < n; ++i) {
          const float f = static_cast<float>(p[i]);
          uint32_t b;
          std::memcpy(&b, &f, sizeof b);
          b -= static_cast<uint32_t>(static_cast<double>(f) > p[i]);
          std::memcpy(o + i, &b, sizeof b);
        }
        return out;
      },
      py::arg("radius"));
  m.def("max_threads", []() { return omp_get_max_threads(); });
  // The ISA builds of the kernels (csrc/cpu/dispatch.h); gmfast/ops/_cpu.py: cpu_info, set_cpu_isa.
  m.def("cpu_isas", []() {
    py::list out;
    for (int i = 0; i < gmfast::isa_count(); ++i) out.append(py::make_tuple(gmfast::isa_name(i), gmfast::isa_supported(i)));
    return out;
  }, "[(name, supported by this CPU)] for every compiled path, fastest first.");
  m.def("cpu_isa", []() { return std::string(gmfast::isa_name(gmfast::isa_active())); }, "The path the kernels run.");
  m.def("cpu_isa_best", []() { return std::string(gmfast::isa_name(gmfast::isa_best())); });
  m.def("cpu_features", &gmfast::cpu_features, "The CPU features the choice of path looks at.");
  m.def("set_cpu_isa", [](const std::string& name) {
    std::string names;
    for (int i = 0; i < gmfast::isa_count(); ++i) {
      if (name != gmfast::isa_name(i)) {
        names += std::string(names.empty() ? "" : ", ") + gmfast::isa_name(i);
        continue;
      }
      if (!gmfast::isa_supported(i))
        fail("cpu path '" + name + "' cannot run on this CPU (it reports: " + gmfast::cpu_features() + ")");
      gmfast::isa_select(i);
      return;
    }
    fail("cpu path: expected one of " + names + ", got '" + name + "'");
  }, py::arg("name"));
  m.def("fma_probe", [](const std::string& name, int64_t iters) {
    for (int i = 0; i < gmfast::isa_count(); ++i)
      if (name == gmfast::isa_name(i)) {
        if (!gmfast::isa_supported(i)) fail("cpu path '" + name + "' cannot run on this CPU");
        double flops = 0.0, secs;
        {
          py::gil_scoped_release nogil;
          secs = gmfast::isa_fma_probe(i, iters, &flops);
        }
        return py::make_tuple(flops, secs);
      }
    fail("cpu path: no path named '" + name + "'");
  }, py::arg("name"), py::arg("iters"), "(float32 flops, seconds) of a register-only FMA loop on that path.");
  m.def(
      "kernel_interface",
      []() {
        py::dict out = gmfast::kernel_interface_dict();
        out["unit_roundoff_f32"] = gmfast::unit_roundoff<float>();
        out["unit_roundoff_f64"] = gmfast::unit_roundoff<double>();
        out["underflow_unit_f32"] = gmfast::underflow_unit<float>();
        out["underflow_unit_f64"] = gmfast::underflow_unit<double>();
        return out;
      },
      "The constants' field order, the kind codes and the base units, as compiled (for tests).");
  m.def(
      "tied_kernel_constants",
      [](index_t d, bool f64) {
        // What the CPU tied kernel uses in place of gmfast._fp.tied_constants (it bounds ||z||
        // with norm_up_from_ss<T> of common.h): exported so a test can check they agree.
        const double u = f64 ? gmfast::unit_roundoff<double>() : gmfast::unit_roundoff<float>();
        const double eta = f64 ? gmfast::underflow_unit<double>() : gmfast::underflow_unit<float>();
        return py::make_tuple(2.0 * static_cast<double>(d) * eta, 1.0 + gmfast::gamma_n(d + 2, u),
                              1.0 + 4.0 * gmfast::kU64, gmfast::slack_up(4), 2.0 * gmfast::kU64,
                              gmfast::slack_down(4));
      },
      py::arg("d"), py::arg("f64"));
  m.def("tied_certify_f32", &tied_certify<float>, py::arg("Z"), py::arg("A"), py::arg("beta"), py::arg("inv"),
        py::arg("alpha"), py::arg("eps"));
  m.def("tied_certify_f64", &tied_certify<double>, py::arg("Z"), py::arg("A"), py::arg("beta"), py::arg("inv"),
        py::arg("alpha"), py::arg("eps"));
  m.def("chol_panel_rows", [](bool f64) { return f64 ? gmfast::chol_panel_rows<double>() : gmfast::chol_panel_rows<float>(); },
        py::arg("f64"), "Rows per packed panel of the Cholesky-form kernels (float32 or float64).");
  m.def("full_certify_chol_f32", &full_certify_chol<float>, py::arg("Z"), py::arg("rpack"), py::arg("rbias"),
        py::arg("kappa"), py::arg("rho"), py::arg("sigma"), py::arg("eps"), py::arg("prec"), py::arg("prec_mu"),
        py::arg("prec_abs_up"), py::arg("mu_norm_up"), py::arg("lam"), py::arg("consts"));
  m.def("full_certify_chol_f64", &full_certify_chol<double>, py::arg("Z"), py::arg("rpack"), py::arg("rbias"),
        py::arg("kappa"), py::arg("rho"), py::arg("sigma"), py::arg("eps"), py::arg("prec"), py::arg("prec_mu"),
        py::arg("prec_abs_up"), py::arg("mu_norm_up"), py::arg("lam"), py::arg("consts"));
  m.def("perclass_certify_f32", &perclass_certify<float>, py::arg("Z"), py::arg("kind"), py::arg("mu"),
        py::arg("prec"), py::arg("kappa"), py::arg("prec_abs_up"), py::arg("mu_norm_up"),
        py::arg("lam"), py::arg("consts"));
  m.def("perclass_certify_f64", &perclass_certify<double>, py::arg("Z"), py::arg("kind"), py::arg("mu"),
        py::arg("prec"), py::arg("kappa"), py::arg("prec_abs_up"), py::arg("mu_norm_up"),
        py::arg("lam"), py::arg("consts"));
}
