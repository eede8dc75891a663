"""CUDA backend: the compiled kernels of ``gmfast._C_cuda`` (csrc/cuda).

Thin by design: make the operands contiguous where the kernels need it, allocate outputs
and bounded scratch with torch (so the caching allocator and the current stream order
everything), pass raw device pointers, shapes and ``torch.cuda.current_stream()`` to C++.

The GEMM of a chunk (tied logits, full-covariance ``û``) is the vendor's (cuBLAS through
``torch.addmm``) whenever it is plain IEEE arithmetic in the working dtype: float64, or
float32 with TF32 off (:func:`gmfast.params.fp32_matmul_is_ieee`). The error bounds hold
for any inner product of length ``d + 1`` in that dtype, any order, FMA or not, so they
cover it; the epilogue kernels then run on the product (``gemm=False``). cuBLAS reaches
about twice the throughput of the module's own SIMT GEMM on an H200 (benchmarks/RESULTS.md,
GPU). With TF32 or reduced-precision float32 matmuls switched on, the module's own GEMM
(always IEEE) runs instead.

The module links the CUDA runtime statically, so it imports on machines without a driver;
``available()`` then reports why it cannot run. If the runtime still fails at the first
real call (e.g. no kernel image for this GPU), the call raises
:class:`~gmfast.ops.BackendFailure`: the dispatcher marks the backend broken for the
process, says so once (:class:`~gmfast.ops.BackendFallbackWarning`) and resolves again
(Triton, or the reference when Triton is unavailable). After one successful call, errors
propagate: they are bugs, not a missing runtime.
"""

from __future__ import annotations

import torch

from gmfast._fp import CovKind

_C = None
_state = {"verified": False}

#: Scratch elements (logits, per-class gradients) per chunk of rows: 32 MiB of float32.
_CHUNK_ELEMS = 1 << 23


def _load():
    global _C
    if _C is None:
        from gmfast import _C_cuda as module

        _C = module
    return _C


def available():
    try:
        C = _load()
    except ImportError as exc:
        return False, (f"gmfast._C_cuda is not built ({exc}); reinstall with GMFAST_CUDA=ON "
                       "(pip install . -Ccmake.define.GMFAST_CUDA=ON, needs a CUDA toolkit)")
    try:
        n = C.device_count()
    except C.CudaError as exc:
        return False, f"the CUDA runtime cannot start: {exc}"
    if n < 1:
        return False, "no CUDA device"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device (a CPU-only torch build?)"
    return True, "ok"


# --------------------------------------------------------------------------------------
# First-call guard
# --------------------------------------------------------------------------------------


def _guarded(run, *args):
    """``run(*args)``; a CUDA runtime error before the first success is a
    :class:`~gmfast.ops.BackendFailure` (the dispatcher marks the backend broken and resolves
    again); after one success, errors propagate: they are bugs, not a missing runtime."""
    if _state["verified"]:
        return run(*args)
    C = _load()
    try:
        out = run(*args)
    except C.CudaError as exc:
        from gmfast.ops import BackendFailure

        raise BackendFailure(f"the CUDA kernels failed at their first call: {exc}") from exc
    _state["verified"] = True
    return out


# --------------------------------------------------------------------------------------
# The contracts
# --------------------------------------------------------------------------------------


def _rows(Z: torch.Tensor) -> torch.Tensor:
    """Z with unit inner stride and non-overlapping rows, copying only if needed."""
    B, d = Z.shape
    if (d > 1 and Z.stride(1) != 1) or (B > 1 and Z.stride(0) < d):
        Z = Z.contiguous()
    return Z


def _suffix(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "f32"
    if dtype == torch.float64:
        return "f64"
    raise TypeError(f"cuda kernels take float32 or float64; got {dtype}")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check(Z, *tensors):
    for t in tensors:
        if t is not None and t.device != Z.device:
            raise ValueError(f"all operands must be on {Z.device}; got one on {t.device}")
    if Z.device.type != "cuda":
        raise ValueError(f"the cuda backend takes CUDA tensors; got {Z.device}")


def _chunk(width: int, lo: int, B: int) -> int:
    """Rows per scratch chunk: ``rows × width ≤ _CHUNK_ELEMS`` but at least ``lo`` rows, and
    at most ``kMaxChunkRows`` (2²¹) of csrc/cuda/kernels.h."""
    return max(1, min(B, 1 << 21, max(lo, _CHUNK_ELEMS // max(1, width))))


def _library_gemm(Z: torch.Tensor) -> bool:
    """Whether ``torch.addmm`` on Z's device and dtype is the IEEE GEMM the bounds assume."""
    from gmfast.params import fp32_matmul_is_ieee

    return Z.dtype == torch.float64 or fp32_matmul_is_ieee(Z.device)


def _tied(Z, A, beta, inv, fp):
    alpha, eps, consts = (None, None, None) if fp is None else fp
    _check(Z, A, beta, inv, alpha, eps)
    C = _load()
    fn = getattr(C, "tied_certify_" + _suffix(Z.dtype))
    Z = _rows(Z)
    B, d = Z.shape
    K = A.shape[0]
    A, beta = A.to(Z.dtype).contiguous(), beta.to(Z.dtype).contiguous()
    f64 = lambda t: None if t is None else t.to(torch.float64).contiguous()  # noqa: E731
    inv, alpha, eps = f64(inv), f64(alpha), f64(eps)
    dev = Z.device
    pred = torch.empty(B, dtype=torch.int64, device=dev)
    radius = torch.empty(B, dtype=torch.float64, device=dev) if inv is not None else None
    if B == 0:
        return pred, radius
    chunk = _chunk(K, 128, B)
    logits = torch.empty(chunk * K, dtype=Z.dtype, device=dev)
    ss = torch.empty(chunk, dtype=Z.dtype, device=dev)
    stream = _stream(dev)
    cst = None if consts is None else list(consts)
    if not _library_gemm(Z):
        fn(dev.index, _ptr(Z), B, d, Z.stride(0) if B > 1 else d, _ptr(A), _ptr(beta), K, _ptr(inv), _ptr(alpha),
           _ptr(eps), cst, _ptr(pred), _ptr(radius), _ptr(logits), _ptr(ss), chunk, stream)
        return pred, radius
    At = A.T
    for r0 in range(0, B, chunk):
        n = min(chunk, B - r0)
        Zc = Z[r0:r0 + n]
        torch.addmm(beta, Zc, At, out=logits[:n * K].view(n, K))
        fn(dev.index, _ptr(Zc), n, d, Zc.stride(0) if n > 1 else d, _ptr(A), _ptr(beta), K, _ptr(inv), _ptr(alpha),
           _ptr(eps), cst, _ptr(pred[r0:]), _ptr(None if radius is None else radius[r0:]), _ptr(logits), _ptr(ss),
           n, stream, gemm=False)
    return pred, radius


def _stream(dev: torch.device) -> int:
    return torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0


def _perclass(Z, p, lam, fp):
    _check(Z, p.mu, p.prec, p.kappa, lam)
    C = _load()
    fn = getattr(C, "perclass_certify_" + _suffix(Z.dtype))
    Z = _rows(Z)
    B, d = Z.shape
    K = p.mu.shape[0]
    T = Z.dtype
    mu, prec = p.mu.to(T).contiguous(), p.prec.to(T).contiguous()
    f64 = lambda t: t.to(torch.float64).contiguous()  # noqa: E731
    kappa, pabs, mun = f64(p.kappa), f64(p.prec_abs_up), f64(p.mu_norm_up)
    lam = None if lam is None else f64(lam)
    dev = Z.device
    pred = torch.empty(B, dtype=torch.int64, device=dev)
    radius = torch.empty(B, dtype=torch.float64, device=dev) if lam is not None else None
    if B == 0:
        return pred, radius
    neg_pm = U = None
    chunk = 1
    if p.kind == "full":
        neg_pm = (-p.prec_mu.to(T)).contiguous()  # exact negation: the kernel adds it as a bias
        chunk = _chunk(K * d, 32, B)
        U = torch.empty(chunk * K * d, dtype=T, device=dev)
    stream = _stream(dev)
    kind, cst = int(CovKind.of(p.kind)), None if fp is None else list(fp.consts)
    if p.kind != "full" or not _library_gemm(Z):
        fn(dev.index, _ptr(Z), B, d, Z.stride(0) if B > 1 else d, kind, _ptr(mu), _ptr(prec), _ptr(neg_pm),
           _ptr(kappa), _ptr(pabs), _ptr(mun), K, _ptr(lam), cst, _ptr(pred), _ptr(radius), _ptr(U), chunk, stream)
        return pred, radius
    # û of a chunk = Z_chunk [P_1; …; P_K]ᵀ + (−P μ): one GEMM of length d + 1 per entry
    Pt = prec.view(K * d, d).T
    bias = neg_pm.view(K * d)
    for r0 in range(0, B, chunk):
        n = min(chunk, B - r0)
        Zc = Z[r0:r0 + n]
        torch.addmm(bias, Zc, Pt, out=U[:n * K * d].view(n, K * d))
        fn(dev.index, _ptr(Zc), n, d, Zc.stride(0) if n > 1 else d, kind, _ptr(mu), _ptr(prec), _ptr(neg_pm),
           _ptr(kappa), _ptr(pabs), _ptr(mun), K, _ptr(lam), cst, _ptr(pred[r0:]),
           _ptr(None if radius is None else radius[r0:]), _ptr(U), n, stream, gemm=False)
    return pred, radius


def tied_certify(Z, A, beta, inv, fp):
    return _guarded(_tied, Z, A, beta, inv, fp)


def perclass_certify(Z, p, lam, fp):
    return _guarded(_perclass, Z, p, lam, fp)
