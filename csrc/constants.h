// The kernels' interface to the rounding-error analysis: the float64 constants each
// fp-sound epilogue reads and the covariance-kind codes. The constants are DERIVED in one
// place only, gmfast/_fp.py (tied_constants, perclass_constants); this header defines the
// layout they arrive in, for the CPU and CUDA kernels alike. Field order = the order of
// gmfast._fp.TIED_FIELDS / PERCLASS_FIELDS (tests/test_constants.py checks both modules'
// exported names against them). Plain C++ (no CUDA or pybind), so nvcc and the host
// compiler both include it.
#pragma once

#include <cstddef>
#include <cstring>

namespace gmfast {

// X-macros: one list per struct, used to declare the fields and to export their names.
#define GMFAST_TIED_CONSTS(X) X(norm_eta2) X(norm_g1) X(norm_up) X(up4) X(two_u64) X(down4)
#define GMFAST_PERCLASS_CONSTS(X)                                                                              \
  X(norm_eta2) X(norm_g1) X(norm_up) X(u) X(g) X(S) X(nu) X(tiny_u) X(tiny_d) X(three_u) X(half_S) X(four_u64) \
  X(one_u) X(down8) X(gd) X(up4)

#define GMFAST_DECLARE_FIELD(name) double name;
#define GMFAST_FIELD_NAME(name) #name,
#define GMFAST_COUNT_FIELD(name) +1

// Tied epilogue: ||z|| <= sqrt((fl(sum z^2) + norm_eta2) * norm_g1) * norm_up (sum in T);
// margins lowered by (e_c + e_j) * up4 + two_u64 * |m|; the radius deflated by down4.
struct TiedConsts {
  GMFAST_TIED_CONSTS(GMFAST_DECLARE_FIELD)
};
// Per-class epilogue (DESIGN 1.4; the derivation of every term: gmfast.ops._reference).
struct PerClassConsts {
  GMFAST_PERCLASS_CONSTS(GMFAST_DECLARE_FIELD)
};

constexpr std::size_t kTiedConstsCount = 0 GMFAST_TIED_CONSTS(GMFAST_COUNT_FIELD);
constexpr std::size_t kPerClassConstsCount = 0 GMFAST_PERCLASS_CONSTS(GMFAST_COUNT_FIELD);
static_assert(sizeof(TiedConsts) == kTiedConstsCount * sizeof(double), "TiedConsts must be packed doubles");
static_assert(sizeof(PerClassConsts) == kPerClassConstsCount * sizeof(double),
              "PerClassConsts must be packed doubles");

inline const char* const* tied_consts_names() {
  static const char* const names[] = {GMFAST_TIED_CONSTS(GMFAST_FIELD_NAME)};
  return names;
}
inline const char* const* perclass_consts_names() {
  static const char* const names[] = {GMFAST_PERCLASS_CONSTS(GMFAST_FIELD_NAME)};
  return names;
}

// A struct from its fields in declaration order (n must be the field count; callers check).
template <class S>
S consts_from(const double* values) {
  S s;
  std::memcpy(&s, values, sizeof(S));
  return s;
}

// Per-class covariance kinds (gmfast._fp.CovKind).
enum class PerClassKind : int { kFull = 0, kDiag = 1, kSpherical = 2 };

}  // namespace gmfast
