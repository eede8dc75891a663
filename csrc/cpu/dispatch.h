// Which ISA build of the CPU kernels runs (isa_table.h, dispatch.cpp). Paths are numbered
// fastest first: on x86-64 avx512, avx2, portable (SSE2, the x86-64 baseline); on aarch64
// the one NEON build ("neon"); elsewhere the portable build.
#pragma once

#include <cstdint>
#include <string>

namespace gmfast {

int isa_count();                // paths compiled into this module
const char* isa_name(int i);    // their names
bool isa_supported(int i);      // whether this CPU (and OS) can run path i
int isa_best();                 // the first supported path: the default
int isa_active();               // the path the kernels run now
void isa_select(int i);         // precondition: isa_supported(i)
std::string cpu_features();     // the CPU features the choice looked at, as reported at run time
// Peak probe of path i (precondition: supported): `iters` register-only FMA steps per thread
// on every OpenMP thread; returns the seconds taken, *flops the float32 flops done.
double isa_fma_probe(int i, int64_t iters, double* flops);

}  // namespace gmfast
