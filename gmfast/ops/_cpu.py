"""CPU backend: the compiled kernels of ``gmfast._C`` (C++/OpenMP).

Thin by design: make the operands contiguous in the working dtype, hand numpy views to
C++, wrap the results as tensors. The GEMM inside the kernels is MKL's, reached through
the ``sgemm_``/``dgemm_`` symbols of the libtorch already in the process (no link to
libtorch); it is checked against ``torch.mm`` once, and the portable blocked GEMM of
``csrc/cpu/gemm.cpp`` runs when the symbols are missing or disagree.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import torch

from gmfast import params
from gmfast._fp import CovKind

_C = None
_blas_state = {"installed": False, "reason": "not probed"}
_blas_lock = threading.Lock()


def _load():
    global _C
    if _C is None:
        from gmfast import _C as module

        _apply_isa_env(module)
        _C = module
        _install_torch_blas()
    return _C


def extension():
    """The compiled CPU extension ``gmfast._C``, loaded on first use (``GMFAST_CPU_ISA`` and
    ``GMFAST_GEMM`` applied, torch's BLAS hook installed): for tools outside ``gmfast.ops``
    that call its entry points directly (the benchmark's FMA probe). Raises ImportError when
    it is not built."""
    return _load()


def available():
    try:
        _load()
    except ImportError as exc:
        return False, f"gmfast._C failed to import ({exc}); reinstall with `pip install .`"
    return True, "ok"


def _torch_blas_addresses():
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(libdir, name)
        if os.path.exists(path):
            lib = ctypes.CDLL(path)
            try:
                return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value, ctypes.cast(lib.dgemm_, ctypes.c_void_p).value
            except AttributeError:
                return None
    return None


def _install_torch_blas() -> None:
    """Use torch's MKL for the kernels' GEMMs if it is there and gives the right answer."""
    with _blas_lock:
        addrs = _torch_blas_addresses()
        if addrs is None or None in addrs:
            _blas_state.update(installed=False, reason="libtorch exports no sgemm_/dgemm_")
            return
        _C.set_blas(*addrs)
        # A wrong integer ABI (ILP64) or argument order would give garbage: compare once.
        g = torch.Generator().manual_seed(0)
        ok = True
        for dt, fn in ((torch.float32, _C.tied_certify_f32), (torch.float64, _C.tied_certify_f64)):
            Z = torch.randn(37, 19, generator=g, dtype=dt)
            A = torch.randn(5, 19, generator=g, dtype=dt)
            beta = torch.zeros(5, dtype=dt)
            pred, _ = fn(Z.numpy(), A.numpy(), beta.numpy(), None, None, None)
            ok = ok and torch.equal(torch.from_numpy(pred), (Z @ A.T).argmax(1))
        if not ok:
            _C.set_blas(0, 0)
            _blas_state.update(installed=False, reason="torch's sgemm_ gave wrong results; using portable GEMM")
            return
        _blas_state.update(installed=True, reason="MKL from libtorch")


_POLICIES = {"auto": 0, "blas": 1, "portable": 2, "micro": 3, "lanes": 4}
_state = {"policy": "auto", "isa_forced": None}
ISA_ENV = "GMFAST_CPU_ISA"


def set_gemm_policy(policy: str) -> None:
    """Which GEMM the kernels use: ``"auto"`` (default: by shape, with the crossover measured
    for the ISA path that runs, ``csrc/cpu/microkernel.h`` and ``benchmarks/RESULTS.md``),
    ``"blas"`` (torch's MKL), ``"portable"`` (the dot-product tiles of ``csrc/cpu/gemm.cpp``),
    ``"micro"`` (the packed register-blocked microkernel of ``csrc/cpu/microkernel.h`` for
    the tied logits; the portable tiles for the GEMMs that have no microkernel variant) or
    ``"lanes"`` (the tied kernel with rows in vector lanes, ``csrc/cpu/tied.cpp``: the same
    microkernel with the operands swapped, and the epilogue across rows; few classes). The
    full-covariance margins always use the microkernel. ``GMFAST_GEMM`` sets it when the kernels
    load. For benchmarks and tests; results are sound either way."""
    if policy not in _POLICIES:
        raise ValueError(f"policy must be one of {tuple(_POLICIES)}; got {policy!r}")
    _load().set_gemm_policy(_POLICIES[policy])
    _state["policy"] = policy


def _set_margin_screen(on: bool) -> None:
    """Whether the many-class tied epilogue screens its classes in float32 before the float64
    work (``csrc/cpu/tied.cpp``: ``screened_min``; on by default). The radii are the same
    bits either way: off only for the tests that check exactly that, and for benchmarks."""
    _load().set_margin_screen(bool(on))


def _select_isa(C, name: str, source: str) -> None:
    names = [n for n, _ in C.cpu_isas()]
    if name == "auto":
        C.set_cpu_isa(C.cpu_isa_best())
        _state["isa_forced"] = None
        return
    if name not in names:
        raise ValueError(f"{source}: expected 'auto' or one of {names}; got {name!r}")
    try:
        C.set_cpu_isa(name)
    except ValueError as exc:
        raise ValueError(f"{source}={name!r}: {exc}; choose one of "
                         f"{[n for n, ok in C.cpu_isas() if ok]} or 'auto'") from None
    _state["isa_forced"] = f"{source}={name}"


GEMM_ENV = "GMFAST_GEMM"


def _apply_isa_env(C) -> None:
    """The environment's forcing, when the kernels load: GMFAST_CPU_ISA (the path) and
    GMFAST_GEMM (the GEMM policy, as :func:`set_gemm_policy`)."""
    want = os.environ.get(ISA_ENV, "").strip()
    if want:
        _select_isa(C, want, ISA_ENV)
    policy = os.environ.get(GEMM_ENV, "").strip()
    if policy:
        if policy not in _POLICIES:
            raise ValueError(f"{GEMM_ENV}: expected one of {tuple(_POLICIES)}; got {policy!r}")
        C.set_gemm_policy(_POLICIES[policy])
        _state["policy"] = policy


def set_cpu_isa(name: str) -> None:
    """Force the instruction-set path of the CPU kernels: ``"auto"`` (the fastest one this
    CPU supports, the default), or a compiled path such as ``"avx512"``, ``"avx2"``,
    ``"portable"`` (x86-64 SSE2) or ``"neon"`` (aarch64); ``cpu_info()["paths"]`` lists them.
    A path this CPU cannot run is refused with an error. The environment variable
    ``GMFAST_CPU_ISA`` does the same when the kernels load. Every path gives sound radii
    (the rounding bounds hold for any blocking, with or without FMA); for tests and
    benchmarks."""
    _select_isa(_load(), name, "set_cpu_isa")


def cpu_info() -> dict:
    """Which path the CPU kernels run and why.

    Returns a dict: ``isa`` (the path that runs), ``reason`` (detected or forced, and how),
    ``forced`` (bool), ``paths`` (each compiled path → ``"ok"`` or why it cannot run here),
    ``cpu_features`` (what the CPU reports at run time), ``gemm_policy`` and ``blas`` (the
    GEMM the kernels may call)."""
    C = _load()
    isa, best = C.cpu_isa(), C.cpu_isa_best()
    paths = {n: "ok" if ok else "not supported by this CPU" for n, ok in C.cpu_isas()}
    forced = _state["isa_forced"]
    if forced:
        reason = f"forced ({forced}); the CPU's own choice would be {best}"
    else:
        reason = f"detected: the fastest compiled path this CPU supports (features: {C.cpu_features()})"
    return dict(isa=isa, reason=reason, forced=forced is not None, paths=paths, cpu_features=C.cpu_features(),
                gemm_policy=_state["policy"], blas=_blas_state["reason"])


def blas_info() -> str:
    _load()
    return _blas_state["reason"]


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().contiguous().numpy()


def _rows(Z: torch.Tensor):
    """A numpy view of Z with unit inner stride (any row stride), copying only if needed."""
    Z = Z.detach()
    if Z.shape[1] > 1 and Z.stride(1) != 1 or Z.stride(0) < Z.shape[1]:
        Z = Z.contiguous()
    return Z.numpy()


def _suffix(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "f32"
    if dtype == torch.float64:
        return "f64"
    raise TypeError(f"cpu kernels take float32 or float64; got {dtype}")


def tied_certify(Z, A, beta, inv, fp):
    C = _load()
    fn = getattr(C, "tied_certify_" + _suffix(Z.dtype))
    # the kernel bounds ||z|| with common.h's norm_up_from_ss, equal to fp.consts
    # (tests/test_constants.py)
    alpha, eps = (None, None) if fp is None else (fp.alpha, fp.eps)
    pred, radius = fn(_rows(Z), _np(A), _np(beta), _np(inv), _np(alpha), _np(eps))
    return torch.from_numpy(pred), None if radius is None else torch.from_numpy(radius)


def _cholesky_pack(p: params.PerClassParams, dtype: torch.dtype):
    """The Cholesky tables in the kernel's layout (``csrc/cpu/kernels.h: full_certify_chol``),
    built once per working copy: each class's ``R_k`` as row panels of ``NR`` rows, panel
    ``p`` holding columns ``p·NR … d−1`` (the triangle's zeros left of it are skipped)."""
    key = ("pack", dtype)
    if key not in p.cholesky:
        t = params.cholesky_tables(p)
        C = _load()
        NR = C.chol_panel_rows(dtype == torch.float64)
        K, d, _ = t.R.shape
        npn = -(-d // NR)
        Rp = torch.zeros(K, npn * NR, d, dtype=torch.float64)
        Rp[:, :d] = t.R.cpu()
        panels = [Rp[:, i0:i0 + NR, i0:].transpose(1, 2).reshape(K, -1) for i0 in range(0, d, NR)]
        rpack = torch.cat(panels, 1).to(dtype).contiguous()
        rbias = torch.zeros(K, npn * NR, dtype=torch.float64)
        rbias[:, :d] = t.b.cpu()
        p.cholesky[key] = (rpack, rbias.to(dtype).contiguous(), t.rho.cpu(), t.sigma.cpu(), t.eps.cpu())
    return p.cholesky[key]


def _consts(fp):
    return None if fp is None else np.asarray(fp.consts, dtype=np.float64)


def perclass_certify(Z, p: params.PerClassParams, lam, fp):
    """Per-class certify; full covariances take the Cholesky form
    (``gmfast.ops._reference.perclass_oracle(form="cholesky")`` is its oracle)."""
    C = _load()
    if p.kind == "full":
        rpack, rbias, rho, sigma, eps = _cholesky_pack(p, Z.dtype)
        fn = getattr(C, "full_certify_chol_" + _suffix(Z.dtype))
        pred, radius = fn(_rows(Z), _np(rpack), _np(rbias), _np(p.kappa), _np(rho), _np(sigma), _np(eps),
                          _np(p.prec), _np(p.prec_mu), _np(p.prec_abs_up), _np(p.mu_norm_up), _np(lam),
                          _consts(fp))
        return torch.from_numpy(pred), None if radius is None else torch.from_numpy(radius)
    fn = getattr(C, "perclass_certify_" + _suffix(Z.dtype))
    pred, radius = fn(_rows(Z), int(CovKind.of(p.kind)), _np(p.mu), _np(p.prec), _np(p.kappa),
                      _np(p.prec_abs_up), _np(p.mu_norm_up), _np(lam), _consts(fp))
    return torch.from_numpy(pred), None if radius is None else torch.from_numpy(radius)
