// The kernels' interface as compiled: the field order of the constants structs and the kind
// codes of constants.h. Both pybind modules (gmfast._C, gmfast._C_cuda) export it as
// kernel_interface(), so tests can check it against gmfast._fp (tests/test_constants.py).
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>

#include "constants.h"

namespace gmfast {

inline pybind11::dict kernel_interface_dict() {
  namespace py = pybind11;
  py::dict out;
  py::list tied, perclass;
  for (std::size_t i = 0; i < kTiedConstsCount; ++i) tied.append(tied_consts_names()[i]);
  for (std::size_t i = 0; i < kPerClassConstsCount; ++i) perclass.append(perclass_consts_names()[i]);
  out["tied_fields"] = tied;
  out["perclass_fields"] = perclass;
  py::dict kinds;
  kinds["full"] = static_cast<int>(PerClassKind::kFull);
  kinds["diag"] = static_cast<int>(PerClassKind::kDiag);
  kinds["spherical"] = static_cast<int>(PerClassKind::kSpherical);
  out["kinds"] = kinds;
  return out;
}

}  // namespace gmfast
