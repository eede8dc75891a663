"""CUDA sources build; the CUDA kernels are right; the backend degrades cleanly.

Without a GPU (CI):

* the sources are compiled and linked with ``nvcc`` (one architecture, into a temporary
  directory) so they cannot rot, and the linked module is imported and probed;
* the same sources, compiled by the host C++ compiler against a stand-in
  ``cuda_runtime.h`` (``GMFAST_CUDA_EMULATE``: every CUDA thread a host thread), are driven
  through :mod:`gmfast.ops._cuda` with CPU tensors and compared with the reference;
* the first-call fallback of :mod:`gmfast.ops._cuda` is exercised with a stand-in module.

With a GPU (``-m gpu``): the cuda and triton backends against the reference on odd shapes,
and ``compute-sanitizer`` on their launches when it is installed.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
from helpers import random_head

from gmfast import ops, params
from gmfast._fp import PERCLASS_FIELDS, TIED_FIELDS, CovKind, perclass_error_model
from gmfast.ops import BackendFallbackWarning, _cuda
from gmfast.ops import _reference as oracle
from gmfast.ops import certify as ops_certify

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
KERNELS = ("gemm", "tied", "perclass")


# --------------------------------------------------------------------------------------
# Build (no GPU needed)
# --------------------------------------------------------------------------------------


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in ("/usr/local/cuda/bin/nvcc",):
            if os.path.exists(cand):
                nvcc = cand
    if nvcc is None:
        pytest.skip("nvcc not found: no CUDA toolkit on PATH, the CUDA sources cannot be compiled here")
    return nvcc


def _run_all(cmds, cwd):
    procs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    for c, p in zip(cmds, procs):
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, f"{' '.join(map(str, c))} failed:\n{out}"
        ours = [ln for ln in out.splitlines() if "warning" in ln.lower() and str(CUDA_SRC) in ln]
        assert not ours, "our CUDA sources compile with warnings:\n" + "\n".join(ours)


_PROBE_MAIN = r"""
// Links every host entry point (all template instantiations) and runs the runtime probe
// the Python module relies on: without a GPU the static runtime must report an error,
// not crash.
#include <cstdio>
#include "cuda/kernels.h"
using namespace gmfast::cuda;
int main() {
  void* entry[] = {
      (void*)&gemm_nt_bias<float>, (void*)&gemm_nt_bias<double>,
      (void*)&tied_certify<float>, (void*)&tied_certify<double>,
      (void*)&perclass_certify<float>, (void*)&perclass_certify<double>};
  int linked = 0;
  for (void* e : entry) linked += e != nullptr;
  int n = -1;
  cudaError_t err = cudaGetDeviceCount(&n);
  std::printf("entry points %d; cudaGetDeviceCount: %s, n=%d\n", linked, cudaGetErrorName(err),
              err == cudaSuccess ? n : 0);
  return 0;
}
"""


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
def test_cuda_sources_compile_and_link(tmp_path):
    """nvcc -c every .cu for sm_80, link an executable against all entry points and the
    pybind11 module, run the executable and import the module: all without a GPU."""
    nvcc = _nvcc()
    import pybind11

    flags = ["-std=c++17", "-arch=sm_80", "-Xcompiler=-fPIC,-fvisibility=hidden", "-I", str(ROOT / "csrc"),
             "-I", sysconfig.get_paths()["include"], "-I", pybind11.get_include()]
    (tmp_path / "probe_main.cu").write_text(_PROBE_MAIN)
    sources = [CUDA_SRC / f"{k}.cu" for k in KERNELS + ("bindings",)] + [tmp_path / "probe_main.cu"]
    _run_all([[nvcc, *flags, "-c", str(s), "-o", f"{s.stem}.o"] for s in sources], tmp_path)
    objs = [f"{k}.o" for k in KERNELS]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    _run_all([
        [nvcc, "-arch=sm_80", *objs, "probe_main.o", "-cudart", "static", "-o", "probe"],
        [nvcc, "-arch=sm_80", "-shared", *objs, "bindings.o", "-cudart", "static", "-o", f"_C_cuda{suffix}"],
    ], tmp_path)
    run = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "entry points 6" in run.stdout, run.stdout + run.stderr
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("_C_cuda", {str(tmp_path / ('_C_cuda' + suffix))!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        assert issubclass(m.CudaError, RuntimeError)
        try:
            print("devices", m.device_count())
        except m.CudaError as exc:
            print("no runtime:", exc)
    """)
    imp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert imp.returncode == 0, imp.stdout + imp.stderr
    assert "devices" in imp.stdout or "gmfast CUDA: cudaGetDeviceCount" in imp.stdout, imp.stdout


# --------------------------------------------------------------------------------------
# The CUDA kernels, emulated on the CPU (no GPU needed)
# --------------------------------------------------------------------------------------

# A stand-in cuda_runtime.h: the sources compiled with a host C++ compiler and
# GMFAST_CUDA_EMULATE run every CUDA thread of a block as a host thread (warp shuffles
# and __syncthreads as barriers), so the kernels' indexing, tiling, warp reductions and
# epilogues are checked against the reference in CI. Not a timing or memory-model test.
_EMU_RUNTIME_H = r"""
// Stand-in for cuda_runtime.h: runs CUDA kernels on the host, one host thread per CUDA
// thread, blocks one after another. Only what gmfast's kernels use; for tests
// (GMFAST_CUDA_EMULATE), not for speed.
#pragma once
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
using cudaStream_t = void*;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaEmulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  std::array<std::array<unsigned char, 16>, 32> slot{};
};
inline thread_local dim3 thread_idx, block_idx;
inline thread_local std::barrier<>* block_bar = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local int lane = 0;

template <class T>
T exchange(T v, int src) {
  std::memcpy(warp->slot[lane].data(), &v, sizeof(T));
  warp->bar.arrive_and_wait();
  T out;
  std::memcpy(&out, warp->slot[src & 31].data(), sizeof(T));
  warp->bar.arrive_and_wait();
  return out;
}

// One host thread per CUDA thread of a block, reused for every block in turn: a block
// starts when all threads have finished the previous one (so `__shared__` can be a
// function-local static).
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const unsigned nt = block.x;
  std::barrier<> bar(nt);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned w = 0; w < (nt + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < nt; ++t)
    ts.emplace_back([&, t] {
      thread_idx = dim3(t);
      block_bar = &bar;
      warp = warps[t / 32].get();
      lane = static_cast<int>(t % 32);
      for (unsigned gz = 0; gz < grid.z; ++gz)
        for (unsigned gy = 0; gy < grid.y; ++gy)
          for (unsigned gx = 0; gx < grid.x; ++gx) {
            block_idx = dim3(gx, gy, gz);
            body();
            bar.arrive_and_wait();
          }
    });
  for (auto& th : ts) th.join();
}
}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int off) { return emu::exchange(v, emu::lane ^ off); }
template <class T>
T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, src); }
inline int __all_sync(unsigned, int p) {
  int all = 1;
  for (int off = 0; off < 32; ++off) all &= emu::exchange(p != 0 ? 1 : 0, off);
  return all;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double f; std::memcpy(&f, &i, 8); return f; }

namespace gmfast::cuda {
using std::fabs;
using std::fma;
using std::fmin;
using std::isfinite;
using std::isnan;
using std::sqrt;
}  // namespace gmfast::cuda
"""


@pytest.fixture(scope="module")
def emulated_module(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the emulated CUDA kernels")
    import importlib.util

    import pybind11

    tmp = tmp_path_factory.mktemp("cuda_emu")
    (tmp / "include").mkdir()
    (tmp / "include" / "cuda_runtime.h").write_text(_EMU_RUNTIME_H)
    out = tmp / ("_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread", "-DGMFAST_CUDA_EMULATE",
           "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-x", "c++", "-I", str(tmp / "include"),
           "-I", str(ROOT / "csrc"), "-I", sysconfig.get_paths()["include"], "-I", pybind11.get_include(),
           *[str(CUDA_SRC / f"{k}.cu") for k in KERNELS + ("bindings",)], "-o", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    ours = [ln for ln in run.stderr.splitlines() if "warning" in ln and str(CUDA_SRC) in ln]
    assert not ours, "\n".join(ours)
    spec = importlib.util.spec_from_file_location("_C_cuda", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["own", "library"])
def cuda_on_cpu(emulated_module, monkeypatch, request):
    """gmfast.ops._cuda driving the emulated module with CPU tensors (host pointers), with
    the module's own GEMM kernel and with the caller's (torch.addmm) GEMM + ``gemm=False``."""

    class Module:
        CudaError = emulated_module.CudaError

        def __getattr__(self, name):
            fn = getattr(emulated_module, name)
            return lambda device, *args, **kw: fn(0, *args, **kw)  # CPU tensors have no device index

    monkeypatch.setattr(_cuda, "_load", lambda: Module())
    monkeypatch.setattr(_cuda, "_check", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(_cuda, "_CHUNK_ELEMS", 1)  # smallest chunks: several per call
    library = request.param == "library"
    monkeypatch.setattr(_cuda, "_library_gemm", lambda Z: library)
    return _cuda


def _emu_sample(head, B, dtype, seed, noncontig):
    g = torch.Generator().manual_seed(seed)
    K, d = head.means_.shape
    Z = (head.means_[torch.randint(0, K, (B,), generator=g)] + torch.randn(B, d, generator=g, dtype=torch.float64))
    Z = Z.to(dtype)
    return torch.cat([Z, Z], 1)[:, :d] if noncontig else Z


def _assert_close(pa, ra, pb, rb, gap, what):
    """Predictions equal (random data has no near-ties at these sizes); radii within a few
    times the reference's own rounding correction ``gap`` (between its plain and sound
    radii), as two correct evaluations in different summation orders."""
    assert torch.equal(pa, pb), f"{what}: predictions differ at rows {(pa != pb).nonzero()[:5].tolist()}"
    tol = 3.0 * gap + 1e-12 * (1.0 + rb.abs())
    bad = (ra - rb).abs() > tol
    assert not bad.any(), f"{what}: radii differ at rows {bad.nonzero()[:5].tolist()}: {ra[bad][:3]} vs {rb[bad][:3]}"


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_cuda_tied_equals_reference(cuda_on_cpu, dtype):
    # skinny (K <= 32) and wide GEMM tiles, several row and column tiles, several chunks
    for B, d, K in ((1, 1, 2), (37, 17, 3), (70, 9, 131), (130, 3, 37)):
        head = _random_head("tied", d, K, seed=B + d + K)
        p = head.classifier_params.to("cpu", dtype)
        Z = _emu_sample(head, B, dtype, seed=B, noncontig=B % 2 == 1)
        for norm in (2, math.inf) if K == 3 else (2,):  # the norm only changes the table
            inv_hat, inv_lo = params.tied_denominators(p, norm)
            pa, ra = cuda_on_cpu._tied(Z, p.A, p.beta, inv_lo, params.tied_error_model(p, d, dtype))
            pb, rb = oracle.tied_oracle(Z, p, norm)
            _, plain = oracle.tied_oracle(Z, p, norm, fp_sound=False)
            gap = (plain - rb).abs()
            _assert_close(pa, ra, pb, rb, gap, f"tied {dtype} B={B} d={d} K={K} norm={norm}")
            pn, rn = cuda_on_cpu._tied(Z, p.A, p.beta, inv_hat, None)
            _assert_close(pn, rn, pb, plain, gap, f"tied plain {dtype} B={B} d={d} K={K}")
            pp, rp = cuda_on_cpu._tied(Z, p.A, p.beta, None, None)
            assert rp is None and torch.equal(pp, pb)


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["full", "diag", "spherical"])
def test_emulated_cuda_perclass_equals_reference(cuda_on_cpu, kind, dtype):
    for B, d, K in ((1, 1, 2), (37, 9, 5), (9, 33, 3)):  # full: K*d <= 32 and > 32 (both GEMM tiles)
        head = _random_head(kind, d, K, seed=B + d + K)
        p = head.classifier_params.to("cpu", dtype)
        Z = _emu_sample(head, B, dtype, seed=B, noncontig=B % 2 == 1)
        lam_hat, lam_up, _ = params.curvature_table(p, "exact")
        pa, ra = cuda_on_cpu._perclass(Z, p, lam_up, perclass_error_model(d, dtype))
        pb, rb = oracle.perclass_oracle(Z, p, curvature="exact")
        _, plain = oracle.perclass_oracle(Z, p, fp_sound=False, curvature="exact")
        gap = (plain - rb).abs()
        _assert_close(pa, ra, pb, rb, gap, f"{kind} {dtype} B={B} d={d} K={K}")
        pn, rn = cuda_on_cpu._perclass(Z, p, lam_hat, None)
        _assert_close(pn, rn, pb, plain, gap, f"{kind} plain {dtype} B={B} d={d} K={K}")
        pp, rp = cuda_on_cpu._perclass(Z, p, None, None)
        assert rp is None and torch.equal(pp, pb)


def test_emulated_cuda_nonfinite_rows(cuda_on_cpu):
    for kind in ("tied", "diag", "full"):
        head = _random_head(kind, 4, 3, seed=2)
        p = head.classifier_params.to("cpu", torch.float32)
        Z = _emu_sample(head, 6, torch.float32, seed=0, noncontig=False)
        Z[1, 2], Z[4, 0] = float("nan"), -float("inf")
        if kind == "tied":
            inv = params.tied_denominators(p, 2)[1]
            pa, ra = cuda_on_cpu._tied(Z, p.A, p.beta, inv, params.tied_error_model(p, 4, torch.float32))
            pb, rb = oracle.tied_oracle(Z, p, 2)
        else:
            lam = params.curvature_table(p, "exact")[1]
            pa, ra = cuda_on_cpu._perclass(Z, p, lam, perclass_error_model(4, torch.float32))
            pb, rb = oracle.perclass_oracle(Z, p, curvature="exact")
        assert pa[[1, 4]].tolist() == [-1, -1] and ra[[1, 4]].tolist() == [0.0, 0.0]
        assert torch.equal(pa, pb) and torch.allclose(ra, rb, rtol=1e-4, atol=1e-7)


def test_emulated_cuda_argument_checks(emulated_module):
    m = emulated_module
    with pytest.raises(ValueError, match="alpha and eps"):
        m.tied_certify_f32(0, 1, 2, 3, 3, 1, 1, 2, 1, 1, 0, None, 1, 1, 1, 1, 8, 0)
    with pytest.raises(ValueError, match="consts must be given exactly when"):
        m.tied_certify_f32(0, 1, 2, 3, 3, 1, 1, 2, 1, 1, 1, None, 1, 1, 1, 1, 8, 0)
    with pytest.raises(ValueError, match=f"consts: expected {len(TIED_FIELDS)} values, got 2"):
        m.tied_certify_f32(0, 1, 2, 3, 3, 1, 1, 2, 1, 1, 1, [1.0, 2.0], 1, 1, 1, 1, 8, 0)
    with pytest.raises(ValueError, match="row stride"):
        m.tied_certify_f32(0, 1, 2, 3, 2, 1, 1, 2, 0, 0, 0, None, 1, 0, 1, 0, 8, 0)
    with pytest.raises(ValueError, match="null device pointer"):
        m.perclass_certify_f64(0, 1, 2, 3, 3, 0, 1, 1, 0, 1, 1, 1, 2, 0, None, 1, 0, 1, 8, 0)
    with pytest.raises(ValueError, match=f"consts: expected {len(PERCLASS_FIELDS)} values, got 1"):
        m.perclass_certify_f64(0, 1, 2, 3, 3, 1, 1, 1, 0, 1, 1, 1, 2, 1, [0.0], 1, 1, 0, 8, 0)
    with pytest.raises(ValueError, match="gemm=False .logits given.: expected chunk >= B"):
        m.tied_certify_f32(0, 1, 5, 3, 3, 1, 1, 2, 0, 0, 0, None, 1, 0, 1, 0, 4, 0, gemm=False)
    with pytest.raises(ValueError, match="gemm=False .U given.: expected chunk >= B"):
        m.perclass_certify_f64(0, 1, 5, 3, 3, 0, 1, 1, 1, 1, 1, 1, 2, 0, None, 1, 0, 1, 4, 0, gemm=False)


def test_emulated_cuda_kernel_interface_matches_python(emulated_module):
    """The CUDA module reads the constants in gmfast._fp's order and numbers kinds as CovKind."""
    got = emulated_module.kernel_interface()
    assert tuple(got["tied_fields"]) == TIED_FIELDS
    assert tuple(got["perclass_fields"]) == PERCLASS_FIELDS
    assert got["kinds"] == {k.name.lower(): int(k) for k in CovKind}


# --------------------------------------------------------------------------------------
# Backend module without a GPU
# --------------------------------------------------------------------------------------


def test_cuda_available_reports_a_reason():
    ok, why = _cuda.available()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert not ok


def _random_head(kind, d, K, seed):
    return random_head(kind, d, K, seed, uniform_priors=True)


class _FakeModule:
    class CudaError(RuntimeError):
        pass

    def device_count(self):
        return 1


@pytest.fixture
def broken_cuda(monkeypatch):
    """_cuda as if the compiled module imported but its kernels fail at the first call, and
    the dispatcher as if CPU tensors were a CUDA device (auto chain cuda → triton → reference)."""
    fake = _FakeModule()

    def fail(*args):
        raise fake.CudaError("gmfast CUDA: tied_epilogue_kernel: cudaErrorNoKernelImageForDevice")

    monkeypatch.setattr(_cuda, "_C", fake)
    monkeypatch.setattr(_cuda, "_tied", fail)
    monkeypatch.setattr(_cuda, "_perclass", fail)
    monkeypatch.setattr(_cuda, "_state", {"verified": False})
    monkeypatch.setitem(ops._status, "triton", (False, "not in this test"))
    monkeypatch.setitem(ops._status, "cuda", (True, "ok"))
    monkeypatch.setitem(ops._DEVICE, "cuda", None)
    monkeypatch.setitem(ops._AUTO, "cpu", ("cuda", "triton"))
    monkeypatch.setattr(ops, "_warned", set())
    return fake


def test_cuda_first_call_failure_is_marked_broken_and_resolved_again(broken_cuda):
    """One fallback rule: the failing backend is marked broken, the call resolves again (here
    to the reference, Triton being unavailable), with a warning; later calls go straight there."""
    head = _random_head("tied", 5, 4, seed=0)
    p = head.classifier_params.to("cpu", torch.float32)
    Z = torch.randn(9, 5)
    inv = params.tied_denominators(p, 2)[1]
    fp = params.tied_error_model(p, 5, torch.float32)
    with pytest.warns(BackendFallbackWarning, match="failed at their first call"):
        pa, ra = ops.call("tied_certify", None, Z, p.A, p.beta, inv, fp)
    assert ops._status["cuda"][0] is False and "NoKernelImage" in ops._status["cuda"][1]
    pb, rb = oracle.tied_oracle(Z, p, 2)
    assert torch.equal(pa, pb) and torch.equal(ra, rb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        pp, rp = ops.call("tied_certify", None, Z, p.A, p.beta, None, None)
    assert rp is None and torch.equal(pp, pb)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: the CUDA kernels failed"):
        ops.call("tied_certify", "cuda", Z, p.A, p.beta, None, None)


@pytest.mark.parametrize("kind", ["full", "diag", "spherical"])
def test_cuda_failure_falls_back_through_the_dispatcher(broken_cuda, kind):
    """The head's certify path (tables built by the dispatcher) after a first-call failure
    equals the reference backend's, for each table and error model."""
    head = _random_head(kind, 4, 3, seed=1)
    p = head.classifier_params.to("cpu", torch.float32)
    Z = torch.randn(7, 4) + p.mu[0]
    for curvature in ("exact", "weyl"):
        for fp_sound in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BackendFallbackWarning)
                pa, ra = ops_certify.perclass_certify(Z, p, fp_sound=fp_sound, need_radius=True, backend=None,
                                                      curvature=curvature)
            pb, rb = oracle.perclass_oracle(Z, p, fp_sound=fp_sound, curvature=curvature)
            assert torch.equal(pa, pb) and torch.equal(ra, rb)
    assert ops._status["cuda"][0] is False


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------


def _need_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")


def _need_backend(name):
    _need_gpu()
    ok, why = ops._probe(name)
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {why}")


GPU_CASES = [  # (kind, B, d, K): odd sizes, single rows, many classes, tile edges
    ("tied", 1, 1, 2), ("tied", 33, 17, 3), ("tied", 257, 129, 37), ("tied", 1000, 64, 1001),
    ("tied", 4099, 513, 10), ("full", 33, 17, 5), ("full", 130, 65, 13), ("diag", 77, 513, 37),
    ("spherical", 129, 33, 130), ("diag", 1, 1, 2),
]


def _compare_on_gpu(backend, monkeypatch):
    """Both GEMMs of the backend: cuBLAS's (``torch.addmm``, the default where it is IEEE)
    and the backend's own kernel."""
    from gmfast.triton import tied as ttied

    failures = []
    for own in (False, True):
        with monkeypatch.context() as m:
            if own:
                m.setattr(_cuda, "_library_gemm", lambda Z: False)
                m.setattr(ttied, "library_gemm", lambda Z: False)
            failures += _compare_cases(backend, "own GEMM" if own else "default GEMM")
    assert not failures, "\n".join(failures[:20])


def _compare_cases(backend, label):
    failures = []
    for (kind, B, d, K), dtype in ((c, dt) for c in GPU_CASES for dt in (torch.float32, torch.float64)):
        head = _random_head(kind, d, K, seed=B + d + K)
        g = torch.Generator().manual_seed(B)
        y = torch.randint(0, K, (B,), generator=g)
        Z = (head.means_[y] + 1.5 * torch.randn(B, d, generator=g, dtype=torch.float64)).to(dtype)
        if B % 2:  # non-contiguous rows
            Z = torch.cat([Z, Z], 1)[:, :d]
        Z = Z.cuda()
        norms = (2, math.inf, 1, "mahalanobis") if kind == "tied" else (2,)
        for norm in norms:
            a = head.certify(Z, norm=norm, backend=backend)
            b = head.certify(Z, norm=norm, backend="reference")
            plain = head.certify(Z, norm=norm, backend="reference", fp_sound=False)
            # two correct evaluations differ by at most a few times the reference's own
            # rounding correction (the gap between its plain and sound radii)
            gap = (plain.radius.double() - b.radius.double()).abs()
            tol = 3.0 * gap + 1e-6 * (1.0 + b.radius.double().abs())
            scores = head.predict_log_proba(Z.double())
            top2 = scores.topk(min(2, K), dim=1).values
            tie = (top2[:, 0] - top2[:, -1]) < (1e-3 if dtype == torch.float32 else 1e-9)
            same = a.prediction == b.prediction
            if (~same & ~tie).any():
                failures.append(f"{backend} ({label}) {kind} {dtype} B={B} d={d} K={K} norm={norm}: "
                                "predictions differ")
            bad = same & ((a.radius.double() - b.radius.double()).abs() > tol)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                failures.append(f"{backend} ({label}) {kind} {dtype} B={B} d={d} K={K} norm={norm}: radius "
                                f"row {i} {float(a.radius[i])} vs {float(b.radius[i])}")
    return failures


def _in_subprocess_without_interpreter(test_name):
    """Triton on a GPU must compile for real: re-run the test with TRITON_INTERPRET=0
    (conftest only sets it when absent)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    # cwd: `python -m` puts the working directory on sys.path, where a source checkout would
    # shadow the installed package and its compiled modules
    run = subprocess.run([sys.executable, "-m", "pytest", f"{__file__}::{test_name}", "-q", "-m", "gpu",
                          "-p", "no:cacheprovider"], env=env, capture_output=True, text=True, timeout=1800,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


@pytest.mark.gpu
def test_cuda_backend_equals_reference_on_gpu(monkeypatch):
    _need_backend("cuda")
    _compare_on_gpu("cuda", monkeypatch)


@pytest.mark.gpu
def test_triton_backend_equals_reference_on_gpu(monkeypatch):
    _need_backend("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _in_subprocess_without_interpreter("test_triton_backend_equals_reference_on_gpu")
        return
    _compare_on_gpu("triton", monkeypatch)


@pytest.mark.gpu
def test_triton_smoothing_counts_on_gpu():
    _need_backend("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _in_subprocess_without_interpreter("test_triton_smoothing_counts_on_gpu")
        return
    from gmfast.ops import _triton
    from gmfast.smoothing import _count

    for K, d in ((3, 17), (130, 65), (1001, 8)):
        p = _random_head("tied", d, K, seed=K).classifier_params.to("cuda", torch.float32)
        N, inputs = 5000, 37
        Z = torch.randn(N, d, device="cuda") * 3
        owner = torch.randint(0, inputs, (N,), device="cuda").sort().values
        counts = _triton.smoothing_counts(Z, owner, inputs, p.A, p.beta)
        logits = torch.addmm(p.beta, Z, p.A.T)
        expect = _count(logits.argmax(1), owner, inputs, K)
        # different summation orders may flip exact near-ties only
        assert int((counts - expect).abs().sum()) <= 2, (K, int((counts - expect).abs().sum()))


_SANITIZE = """
import math, os, torch
from gmfast import GaussianMixtureHead as Head
g = torch.Generator().manual_seed(0)
for kind, B, d, K in (("tied", 37, 19, 5), ("tied", 70, 9, 131), ("full", 21, 7, 4), ("diag", 9, 33, 6),
                      ("spherical", 5, 3, 40)):
    mu = torch.randn(K, d, generator=g, dtype=torch.float64)
    cov = {"tied": torch.eye(d), "full": torch.eye(d).expand(K, d, d), "diag": torch.ones(K, d),
           "spherical": torch.ones(K)}[kind].double()
    head = Head.from_params(mu, cov, torch.full((K,), 1.0 / K, dtype=torch.float64), kind)
    Z = torch.randn(B, d, generator=g).cuda()
    for backend in os.environ["BACKENDS"].split(","):
        head.certify(Z, backend=backend)
        head.predict(Z, backend=backend)
torch.cuda.synchronize()
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compute_sanitizer_clean(backend):
    _need_backend(backend)
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer not found on PATH")
    env = dict(os.environ, TRITON_INTERPRET="0", BACKENDS=backend)
    run = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", _SANITIZE],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout[-6000:] + run.stderr[-3000:]

