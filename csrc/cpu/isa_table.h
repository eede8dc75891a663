// The seam between the per-ISA kernel builds and the dispatcher (dispatch.cpp).
//
// The kernel sources (gemm.cpp, tied.cpp, perclass.cpp, fullchol.cpp, isa_entry.cpp) are
// compiled once per instruction set with the namespace renamed (CMakeLists.txt:
// -Dgmfast=gmfast_<isa>), so each build has its own symbols and none can be picked by the
// linker for another. This header names only plain C types and C linkage (nothing in it is
// spelled with that namespace), so the dispatcher and every build see the same declarations:
// each build exports one table of its entry points; the shared state (the BLAS installed from
// Python, the GEMM policy) lives once, in dispatch.cpp, behind C accessors.
#pragma once

#include <cstdint>

extern "C" {

typedef void (*GmfastSgemm)(const char*, const char*, const int*, const int*, const int*, const float*,
                            const float*, const int*, const float*, const int*, const float*, float*, const int*);
typedef void (*GmfastDgemm)(const char*, const char*, const int*, const int*, const int*, const double*,
                            const double*, const int*, const double*, const int*, const double*, double*,
                            const int*);

// Shared state, defined in dispatch.cpp (baseline code).
GmfastSgemm gmfast_state_sgemm(void);
GmfastDgemm gmfast_state_dgemm(void);
int gmfast_state_policy(void);
int gmfast_state_screen(void);  // common.h: margin_screen

// One ISA build's entry points; the signatures are those of kernels.h with the kind passed as
// int and the rounding constants (constants.h: PerClassConsts, a struct of packed doubles) as
// their doubles (null: fp_sound=False).
struct GmfastIsaTable {
  const char* name;
  int tile_rows;       // kMR of microkernel.h
  int tile_cols_f32;   // tile_width<float>()
  void (*tied_f32)(const float*, int64_t, int64_t, int64_t, const float*, const float*, int64_t, const double*,
                   const double*, const double*, int64_t*, double*);
  void (*tied_f64)(const double*, int64_t, int64_t, int64_t, const double*, const double*, int64_t, const double*,
                   const double*, const double*, int64_t*, double*);
  void (*perclass_f32)(const float*, int64_t, int64_t, int64_t, int, const float*, const float*,
                       const double*, const double*, const double*, int64_t, const double*, const double*, int64_t*,
                       double*);
  void (*perclass_f64)(const double*, int64_t, int64_t, int64_t, int, const double*, const double*,
                       const double*, const double*, const double*, int64_t, const double*, const double*, int64_t*,
                       double*);
  void (*chol_f32)(const float*, int64_t, int64_t, int64_t, const float*, const float*, const double*,
                   const double*, const double*, const double*, const float*, const float*, const double*,
                   const double*, int64_t, const double*, const double*, int64_t*, double*);
  void (*chol_f64)(const double*, int64_t, int64_t, int64_t, const double*, const double*, const double*,
                   const double*, const double*, const double*, const double*, const double*, const double*,
                   const double*, int64_t, const double*, const double*, int64_t*, double*);
  // A register-only loop of independent FMAs (or multiply-adds where the ISA has no FMA) on
  // this build's vectors, `iters` steps on every OpenMP thread; stores the float32 flops done
  // in *flops and returns a value that depends on every step (nothing is optimised away).
  // The peak that benchmarks/RESULTS.md compares each path's kernels with.
  double (*fma_probe_f32)(int64_t iters, double* flops);
};

extern const GmfastIsaTable gmfast_isa_avx512;
extern const GmfastIsaTable gmfast_isa_avx2;
extern const GmfastIsaTable gmfast_isa_portable;

}  // extern "C"
